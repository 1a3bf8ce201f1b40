"""The preprocessing stage's datasets: tfds builders and the synthetic set generator.

    python -m data.synthetic_av.generate --out_dir=DIR [--size=default|tiny] [--seed=0]
    python -m data.build --dataset=synthetic_av|aff_wild2 --manual_dir=DIR --data_dir=DIR

See docs/DATA.md.
"""
