"""CCC loss (JAX) and evaluation metrics (NumPy) against independent computations."""

import audmetric
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from jax.sharding import PartitionSpec as P

from iaca_jax import losses, metrics


def reference_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """CCC written out with NumPy's biased (population) covariance."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = np.cov(x, y, bias=True)
    return 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1] + (x.mean() - y.mean()) ** 2)


def random_batch(rng: np.random.Generator, batch: int = 4, length: int = 16, invalid: float = 0.2):
    """(B, L, 2) labels in [-1, 1] with some -5 clips, correlated predictions, and the valid mask."""
    labels = rng.uniform(-1, 1, (batch, length, 2))
    preds = 0.6 * labels + 0.3 * rng.normal(size=labels.shape) + 0.1
    bad = rng.random((batch, length)) < invalid
    labels[bad] = -5.0
    preds[bad] = np.nan  # masked entries must not leak, even as NaN
    return preds.astype(np.float32), labels.astype(np.float32), ~bad


# ----------------------------------------------------------------------------- CCC values


def test_ccc_matches_audmetric_and_numpy():
    rng = np.random.default_rng(0)
    preds, labels, mask = random_batch(rng, batch=8, length=16)
    for d in range(2):
        x, y = preds[..., d][mask].astype(np.float64), labels[..., d][mask].astype(np.float64)
        want = reference_ccc(x, y)
        assert metrics.concordance_cc(x, y) == pytest.approx(want, abs=1e-12)
        assert metrics.concordance_cc(x, y) == pytest.approx(audmetric.concordance_cc(y, x), abs=1e-12)
        got = losses.masked_ccc(jnp.asarray(preds[..., d]), jnp.asarray(labels[..., d]), jnp.asarray(mask))
        assert float(got) == pytest.approx(want, abs=1e-5)
    ref_loss = 2 - sum(reference_ccc(preds[..., d][mask], labels[..., d][mask]) for d in range(2))
    loss, aux = jax.jit(losses.ccc_loss)(preds, labels, mask)
    assert float(loss) == pytest.approx(ref_loss, abs=1e-5)
    assert int(aux["n_valid"]) == mask.sum()
    as_dict = {"valence": preds[..., :1], "arousal": preds[..., 1]}  # (B, L, 1) and (B, L) both accepted
    assert float(losses.ccc_loss(as_dict, labels, mask)[0]) == pytest.approx(ref_loss, abs=1e-5)


def test_ccc_bf16_predictions_are_upcast():
    rng = np.random.default_rng(1)
    preds, labels, mask = random_batch(rng)
    bf16 = jnp.asarray(preds).astype(jnp.bfloat16)
    loss = losses.ccc_loss(bf16, labels, mask)[0]
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(float(losses.ccc_loss(bf16.astype(jnp.float32), labels, mask)[0]), abs=1e-6)


def test_ccc_near_constant_far_from_zero():
    """Two-pass statistics: a tiny variance on a large offset still gives the float64 answer."""
    rng = np.random.default_rng(2)
    y = rng.normal(size=512)
    x = 50.0 + 1e-3 * (y + rng.normal(size=512))
    got = float(losses.masked_ccc(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.ones(512, bool)))
    assert got == pytest.approx(reference_ccc(np.float32(x), np.float32(y)), rel=1e-3)


def test_moments_add_up_over_parts():
    rng = np.random.default_rng(3)
    preds, labels, mask = random_batch(rng, batch=6)
    parts = [losses.ccc_moments(preds[i : i + 2, :, 0], labels[i : i + 2, :, 0], mask[i : i + 2]) for i in (0, 2, 4)]
    summed = jax.tree.map(lambda *v: sum(v), *parts)
    want = reference_ccc(preds[..., 0][mask], labels[..., 0][mask])
    assert float(losses.ccc_from_moments(summed)) == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------- streaming


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(4)
    n = 5000
    labels = rng.uniform(-1, 1, (n, 2))
    preds = 3.0 + 0.5 * labels + 0.2 * rng.normal(size=(n, 2))  # offset: stresses the variance
    mask = rng.random(n) > 0.15
    mask[100:400] = False  # a fully masked batch below
    cuts = np.sort(np.concatenate([rng.choice(np.arange(1, n), 40, replace=False), [100, 400, 400]]))
    bounds = list(zip(np.r_[0, cuts], np.r_[cuts, n]))  # uneven, including an empty batch
    accs = [metrics.CCCAccumulator.empty(), metrics.CCCAccumulator.empty()]
    for i, (a, b) in enumerate(bounds):
        accs[i % 2] = accs[i % 2].update(preds[a:b], labels[a:b], mask[a:b])
    for merged in (accs[0].merge(accs[1]), accs[1].merge(accs[0])):
        result = merged.result()
        want = [metrics.concordance_cc(preds[mask, d], labels[mask, d]) for d in range(2)]
        assert result["ccc_valence"] == pytest.approx(want[0], abs=1e-12)
        assert result["ccc_arousal"] == pytest.approx(want[1], abs=1e-12)
        assert result["ccc_mean"] == pytest.approx(np.mean(want), abs=1e-12)
        assert merged.n.tolist() == [mask.sum()] * 2


def test_streaming_per_dimension_mask_and_empty():
    rng = np.random.default_rng(5)
    preds, labels = rng.normal(size=(300, 2)), rng.normal(size=(300, 2))
    mask = rng.random((300, 2)) > 0.3
    acc = metrics.CCCAccumulator.empty().update(preds[:120], labels[:120], mask[:120])
    acc = acc.update(preds[120:], labels[120:], mask[120:])
    for d in range(2):
        assert acc.ccc()[d] == pytest.approx(reference_ccc(preds[mask[:, d], d], labels[mask[:, d], d]), abs=1e-12)
    assert np.isnan(metrics.CCCAccumulator.empty().ccc()).all()


# ----------------------------------------------------------------------------- sharded loss


def test_sharded_loss_is_exact_global_loss():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    rng = np.random.default_rng(6)
    preds, labels, mask = random_batch(rng, batch=16, length=8)
    shift = np.repeat(np.linspace(-0.6, 0.6, 8), 2)[:, None, None]  # a different offset per device
    labels = np.where(mask[..., None], 0.3 * labels + shift, labels).astype(np.float32)
    preds = np.where(mask[..., None], preds * np.repeat(np.linspace(0.2, 1.5, 8), 2)[:, None, None], preds)
    preds = preds.astype(np.float32)
    mesh = jax.make_mesh((8,), ("data",))  # Explicit axis type in this JAX: place the inputs
    preds, labels, mask = jax.device_put((preds, labels, mask), jax.NamedSharding(mesh, P("data")))

    def sharded(p, l, m):
        fn = lambda p, l, m: losses.ccc_loss(p, l, m, axis_name="data")[0]  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P())(p, l, m)

    def per_device(p, l, m):
        fn = lambda p, l, m: losses.ccc_loss(p, l, m)[0][None]  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(p, l, m)

    global_loss = float(jax.jit(lambda p, l, m: losses.ccc_loss(p, l, m)[0])(preds, labels, mask))
    assert float(jax.jit(sharded)(preds, labels, mask)) == pytest.approx(global_loss, abs=1e-5)
    naive = float(jnp.mean(jax.jit(per_device)(preds, labels, mask)))
    assert abs(naive - global_loss) > 0.01  # the naive mean of per-device losses is wrong (here by 0.035)

    grad_sharded = jax.jit(jax.grad(sharded))(preds, labels, mask)
    grad_global = jax.jit(jax.grad(lambda p, l, m: losses.ccc_loss(p, l, m)[0]))(preds, labels, mask)
    np.testing.assert_allclose(np.asarray(grad_sharded), np.asarray(grad_global), atol=1e-5)
    assert np.all(np.asarray(grad_global)[~np.asarray(mask)] == 0)


# ----------------------------------------------------------------------------- masking edge cases


def test_fully_masked_batch_has_zero_finite_gradient():
    preds = jnp.full((2, 4, 2), jnp.nan).at[0, 0].set(0.3)
    labels = jnp.full((2, 4, 2), -5.0)
    mask = jnp.zeros((2, 4), bool)
    loss_fn = jax.jit(lambda p: losses.ccc_loss(p, labels, mask)[0])
    assert float(loss_fn(preds)) == 0.0
    grad = jax.grad(loss_fn)(preds)
    assert np.all(np.asarray(grad) == 0)


def test_single_valid_clip_and_nan_outside_mask_are_finite():
    rng = np.random.default_rng(7)
    preds, labels, mask = random_batch(rng)
    one_clip = np.zeros_like(mask)
    one_clip[1, 3] = True
    for m in (mask, one_clip):
        loss, grad = jax.value_and_grad(lambda p: losses.ccc_loss(p, labels, m)[0])(jnp.asarray(preds))
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
        assert np.all(np.asarray(grad)[~m] == 0)


# ----------------------------------------------------------------------------- smoothing


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 20, 21, 49, 50])
@pytest.mark.parametrize("length", [1, 7, 19, 20, 49, 50, 51, 123, 1000])
def test_smoothing_matches_scipy(size, length):
    x = np.random.default_rng(size * 1000 + length).uniform(-1.5, 1.5, length)  # some values get clipped
    want = scipy.ndimage.uniform_filter1d(np.clip(x, -1, 1), size=size, mode="constant", cval=0.0)
    np.testing.assert_allclose(metrics.postprocess_video(x, size), want, rtol=0, atol=1e-12)


def test_smoothing_long_sequence_and_centring():
    x = np.random.default_rng(8).uniform(-1, 1, 50_000) * 0.5 + 0.5  # mostly positive: cumsum grows
    for size in (20, 50):
        want = scipy.ndimage.uniform_filter1d(x, size=size, mode="constant", cval=0.0)
        np.testing.assert_allclose(metrics.postprocess_video(x, size), want, rtol=0, atol=1e-10)
    impulse = np.zeros(10)
    impulse[5] = 1.0  # even size 4 covers [i - 2, i + 1]: output i sees frame 5 for i in 4..7
    np.testing.assert_allclose(metrics.postprocess_video(impulse, 4), np.r_[[0] * 4, [0.25] * 4, [0] * 2])


def test_postprocess_predictions_default_windows():
    rng = np.random.default_rng(9)
    v, a = rng.uniform(-1.2, 1.2, (2, 300))
    sv, sa = metrics.postprocess_predictions(v, a)
    np.testing.assert_allclose(sv, scipy.ndimage.uniform_filter1d(np.clip(v, -1, 1), 20, mode="constant"), atol=1e-12)
    np.testing.assert_allclose(sa, scipy.ndimage.uniform_filter1d(np.clip(a, -1, 1), 50, mode="constant"), atol=1e-12)


# ----------------------------------------------------------------------------- clips -> frames -> split CCC


def _clip_value(video: str, frame: int) -> list[float]:
    offset = {"a": 0.0, "b": 0.5}[video]
    return [offset + frame / 10, -(offset + frame / 10)]


def test_frames_from_clips_round_trip():
    names = np.array([["a"] * 4, ["a", "b", "b", "b"], [b"b", "pad", "pad", "pad"]], dtype=object)
    ends = np.array([[1, 2, 3, 4], [5, 2, 1, 3], [3, 0, 0, 0]])
    mask = np.array([[True] * 4, [True] * 4, [True, False, False, False]])  # b:3 twice, identical
    preds = np.array([[_clip_value(n.decode() if isinstance(n, bytes) else n, f) if n != "pad" else [9.0, 9.0]
                       for n, f in zip(row_n, row_f)] for row_n, row_f in zip(names, ends)])
    out = metrics.frames_from_clips(names, ends, preds, mask)
    assert sorted(out) == ["a", "b"]
    frames_a, preds_a = out["a"]
    np.testing.assert_array_equal(frames_a, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(preds_a, [_clip_value("a", f) for f in range(1, 6)])
    frames_b, preds_b = out["b"]
    np.testing.assert_array_equal(frames_b, [1, 2, 3])
    np.testing.assert_allclose(preds_b, [_clip_value("b", f) for f in range(1, 4)])

    as_dict = {"valence": preds[..., 0], "arousal": preds[..., 1]}
    per_sequence = metrics.frames_from_clips(["a"], ends[:1], as_dict["valence"][:1, :, None])
    np.testing.assert_array_equal(per_sequence["a"][0], [1, 2, 3, 4])

    # Back through the split evaluation without smoothing: CCC of the known per-frame values.
    labels = {"a": np.array([[0.1, 0.0], [-5, -5], [0.4, -0.2], [0.3, 0.1], [0.6, -0.6]]),
              "b": np.array([[0.7, -0.5], [0.6, -0.8], [0.9, -0.7]])}
    result = metrics.evaluate_split(out, labels, windows=(1, 1))
    frame_preds = np.array([_clip_value("a", f) for f in (1, 3, 4, 5)] + [_clip_value("b", f) for f in (1, 2, 3)])
    frame_labels = np.concatenate([labels["a"][[0, 2, 3, 4]], labels["b"]])
    assert result["n_frames"] == 7
    for d, name in enumerate(metrics.DIMENSIONS):
        want = reference_ccc(np.clip(frame_preds[:, d], -1, 1), frame_labels[:, d])
        assert result[f"ccc_{name}"] == pytest.approx(want, abs=1e-12)


def test_frames_from_clips_rejects_conflicting_duplicates():
    names = np.array([["a", "a"], ["a", "a"]])
    ends = np.array([[1, 2], [2, 3]])
    preds = np.zeros((2, 2, 2))
    preds[1, 0] = 0.5  # frame 2 of video a predicted twice, differently
    with pytest.raises(ValueError, match="different predictions"):
        metrics.frames_from_clips(names, ends, preds)
    preds[1, 0] = 0.0
    assert metrics.frames_from_clips(names, ends, preds)["a"][0].tolist() == [1, 2, 3]


def test_evaluate_split_against_scipy_and_audmetric():
    rng = np.random.default_rng(10)
    lengths = {"v1": 37, "v2": 120, "v3_left": 300, "v4": 5}
    labels, preds, corrupted = {}, {}, {}
    for video, n in lengths.items():
        lab = np.clip(np.cumsum(rng.normal(0, 0.1, (n, 2)), 0), -1, 1)
        start = rng.integers(0, n)
        lab[start : start + n // 5] = -5.0
        labels[video] = lab
        preds[video] = lab + rng.normal(0, 0.4, (n, 2))  # partly outside [-1, 1]
        if video != "v4":
            corrupted[video] = rng.random(n) < 0.3
    want_p, want_l, want_c = [], [], []
    for video, lab in labels.items():
        smooth = np.stack([scipy.ndimage.uniform_filter1d(np.clip(preds[video][:, d], -1, 1), w, mode="constant")
                           for d, w in enumerate((20, 50))], -1)
        valid = (lab[:, 0] != -5) & (lab[:, 1] != -5)
        want_p.append(smooth[valid])
        want_l.append(lab[valid])
        want_c.append(corrupted.get(video, np.zeros(len(lab), bool))[valid])
    want_p, want_l, want_c = map(np.concatenate, (want_p, want_l, want_c))

    result = metrics.evaluate_split(preds, labels, subsets={"corrupted": corrupted})
    for d, name in enumerate(metrics.DIMENSIONS):
        assert result[f"ccc_{name}"] == pytest.approx(audmetric.concordance_cc(want_l[:, d], want_p[:, d]), abs=1e-10)
        sub = audmetric.concordance_cc(want_l[want_c, d], want_p[want_c, d])
        assert result[f"corrupted/ccc_{name}"] == pytest.approx(sub, abs=1e-10)
    assert result["ccc_mean"] == pytest.approx((result["ccc_valence"] + result["ccc_arousal"]) / 2)
    assert result["n_frames"] == len(want_l) and result["corrupted/n_frames"] == want_c.sum()

    # The same from shuffled (frame_numbers, predictions) pairs, 1-based.
    pairs = {}
    for video, p in preds.items():
        order = rng.permutation(len(p))
        pairs[video] = (order + 1, p[order])
    assert metrics.evaluate_split(pairs, labels)["ccc_mean"] == pytest.approx(result["ccc_mean"], abs=1e-12)
    frames, p = pairs["v2"]
    pairs["v2"] = (frames[frames != 7], p[frames != 7])
    with pytest.raises(ValueError, match="no prediction"):
        metrics.evaluate_split(pairs, labels)
    assert np.isfinite(metrics.evaluate_split(pairs, labels, fill_missing=0.0)["ccc_mean"])
