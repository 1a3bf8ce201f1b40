"""`python -m iaca_jax.conversion ...`: see `iaca_jax.conversion.convert`."""

import sys

from iaca_jax.conversion import convert

sys.exit(convert.main())
