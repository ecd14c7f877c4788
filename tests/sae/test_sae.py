"""Pin the SAE maths against naive loop references, and the SAELens save/load round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from midisc.sae import Output, ReluSAE, SparseAutoencoder, TopKSAE, load_sae

D_IN, EXPANSION = 6, 4
D_SAE = D_IN * EXPANSION


def randomise(sae: SparseAutoencoder, seed: int = 0) -> SparseAutoencoder:
    """Give every parameter, biases included, non-trivial values so the references test them all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def make(arch: str, **kw) -> SparseAutoencoder:
    if arch == "standard":
        return ReluSAE(D_IN, EXPANSION, l1_coef=kw.pop("l1_coef", 0.1), seed=1, **kw)
    return TopKSAE(D_IN, EXPANSION, k=kw.pop("k", 5), seed=1, **kw)


# --- naive references: plain loops over rows and features, nothing shared with the module ----
def naive_pre_acts(sae, x):
    W_enc, b_enc, b_dec = sae.W_enc.tolist(), sae.b_enc.tolist(), sae.b_dec.tolist()
    return [[sum((row[i] - b_dec[i]) * W_enc[i][j] for i in range(len(row))) + b_enc[j]
             for j in range(len(b_enc))] for row in x.tolist()]


def naive_encode(sae, x):
    pre = naive_pre_acts(sae, x)
    if isinstance(sae, ReluSAE):
        return [[max(v, 0.0) for v in row] for row in pre]
    codes = []
    for row in pre:
        keep = sorted(range(len(row)), key=lambda j: row[j], reverse=True)[: sae.k]
        codes.append([max(row[j], 0.0) if j in keep else 0.0 for j in range(len(row))])
    return codes


def naive_decode(sae, codes):
    W_dec, b_dec = sae.W_dec.tolist(), sae.b_dec.tolist()
    return [[sum(c[j] * W_dec[j][i] for j in range(len(c))) + b_dec[i] for i in range(len(b_dec))]
            for c in codes]


def naive_forward(sae, x):
    codes = naive_encode(sae, x)
    x_hat = naive_decode(sae, codes)
    rows = x.tolist()
    mse = sum((a - b) ** 2 for r, h in zip(rows, x_hat) for a, b in zip(r, h)) / (len(rows) * len(rows[0]))
    norms = [math.sqrt(sum(v * v for v in w)) for w in sae.W_dec.tolist()]
    l1 = sum(sum(c * n for c, n in zip(row, norms)) for row in codes) / len(codes)
    loss = mse + sae.l1_coef * l1 if isinstance(sae, ReluSAE) else mse
    return codes, x_hat, mse, l1, loss


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=tol)


# --- shapes and the maths --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_parameter_and_output_shapes(arch):
    sae = make(arch)
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes == {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    out = sae(torch.randn(7, D_IN))
    assert isinstance(out, Output)
    assert out.x_hat.shape == (7, D_IN) and out.codes.shape == (7, D_SAE)
    assert out.loss.ndim == out.mse.ndim == out.l1.ndim == 0
    assert (out.codes >= 0).all()


def test_d_sae_overrides_expansion():
    assert TopKSAE(D_IN, 8, k=3, d_sae=10).W_dec.shape == (10, D_IN)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_encode_decode_forward_match_naive_reference(arch):
    sae = randomise(make(arch))
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3))
    codes, x_hat, mse, l1, loss = naive_forward(sae, x)
    with torch.no_grad():
        assert close(sae.pre_acts(x), naive_pre_acts(sae, x))
        assert close(sae.encode(x), codes)
        assert close(sae.decode(torch.tensor(codes)), x_hat)
        out = sae(x)
    assert close(out.codes, codes) and close(out.x_hat, x_hat)
    assert close(out.mse, mse) and close(out.l1, l1) and close(out.loss, loss)


def test_leading_dims_are_kept():
    sae = randomise(make("topk"))
    x = torch.randn(2, 3, D_IN)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x).reshape(6, D_SAE), sae.encode(x.reshape(6, D_IN)))


def test_wrong_input_width_names_the_shape():
    with pytest.raises(ValueError, match=r"d_in=6.*\(4, 5\)"):
        make("standard").encode(torch.randn(4, 5))


def test_topk_has_exactly_k_nonzeros_when_all_pre_acts_positive():
    sae = randomise(make("topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation is then far above zero
        codes = sae.encode(torch.randn(32, D_IN))
    assert ((codes > 0).sum(dim=-1) == 5).all()


def test_topk_never_more_than_k_nonzeros():
    sae = randomise(make("topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # many negatives: fewer than k survive the ReLU
        codes = sae.encode(torch.randn(256, D_IN))
    counts = (codes > 0).sum(dim=-1)
    assert (counts <= 5).all() and (counts < 5).any()


# --- decoder norm and the gradient projection ------------------------------------------------
def row_norms(sae):
    return sae.W_dec.detach().norm(dim=1)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_decoder_rows_unit_norm_after_init_and_normalize(arch):
    sae = make(arch)
    assert torch.allclose(row_norms(sae), torch.ones(D_SAE), atol=1e-6)
    assert torch.allclose(sae.W_enc, sae.W_dec.T)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 5 + 0.1)
    sae.normalize_decoder()
    assert torch.allclose(row_norms(sae), torch.ones(D_SAE), atol=1e-6)


def test_normalize_decoder_keeps_zero_rows_finite():
    sae = make("standard")
    with torch.no_grad():
        sae.W_dec[3].zero_()
    sae.normalize_decoder()
    assert torch.isfinite(sae.W_dec).all() and (sae.W_dec[3] == 0).all()


def test_remove_parallel_grad_leaves_gradient_orthogonal_to_rows():
    sae = make("standard")
    sae.remove_parallel_grad()  # no gradient yet: must be a harmless no-op
    sae.W_dec.grad = torch.randn(D_SAE, D_IN)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    W, g = sae.W_dec.detach().tolist(), sae.W_dec.grad.tolist()
    for j in range(D_SAE):
        assert abs(sum(a * b for a, b in zip(W[j], g[j]))) < 1e-5
        # only the parallel part was removed: the change is along the row itself
        along = sum(a * b for a, b in zip(W[j], before[j].tolist()))
        assert close(before[j] - torch.tensor(g[j]), [along * w for w in W[j]])


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_adam_step_with_projection_and_normalize_keeps_unit_norm(arch):
    sae = make(arch)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(3):
        sae(torch.randn(16, D_IN)).loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        assert torch.allclose(row_norms(sae), torch.ones(D_SAE), atol=1e-5)


# --- b_dec initialisation --------------------------------------------------------------------
def test_init_b_dec_mean_equals_sample_mean():
    sae = make("standard")
    sample = torch.randn(100, D_IN) + 3
    sae.init_b_dec(sample, method="mean")
    assert torch.allclose(sae.b_dec, sample.mean(dim=0))


def test_geometric_median_is_robust_to_outliers():
    g = torch.Generator().manual_seed(0)
    bulk = torch.randn(200, D_IN, generator=g) * 0.1 + 2.0  # centred at (2, .., 2)
    outliers = torch.full((5, D_IN), 1000.0)  # a few attention-sink-like tokens
    sample = torch.cat([bulk, outliers])
    centre = torch.full((D_IN,), 2.0)
    by_median, by_mean = make("standard"), make("standard")
    by_median.init_b_dec(sample)  # geometric median is the default
    by_mean.init_b_dec(sample, method="mean")
    assert (by_median.b_dec - centre).norm() < 0.1
    assert (by_mean.b_dec - centre).norm() > 10


def test_geometric_median_of_symmetric_points_is_their_centre():
    sae = make("standard")
    pts = torch.cat([torch.eye(D_IN), -torch.eye(D_IN)]) + 1.5
    sae.init_b_dec(pts)
    assert torch.allclose(sae.b_dec, torch.full((D_IN,), 1.5), atol=1e-4)


# --- save / load ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_save_load_round_trip_is_exact(arch, tmp_path):
    sae = randomise(make(arch))
    folder = sae.save(tmp_path / "sae", metadata={"hook_name": "blocks.3.hook_resid_post"})
    assert folder == tmp_path / "sae"
    loaded = load_sae(folder)
    assert type(loaded) is type(sae) and not loaded.training
    assert loaded.hparams() == sae.hparams()
    x = torch.randn(9, D_IN)
    with torch.no_grad():
        a, b = sae(x), loaded(x)
    for field in ("x_hat", "codes", "loss", "mse", "l1"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field

    cfg = json.loads((folder / "cfg.json").read_text())
    assert {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none"}.items() <= cfg.items()
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    if arch == "topk":
        assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert cfg["metadata"]["l1_coefficient"] == 0.1 and "k" not in cfg

    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in weights.values())


def test_relu_without_l1_metadata_loads_with_zero_coef(tmp_path):
    folder = make("standard").save(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["l1_coefficient"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(folder).l1_coef == 0.0


# --- errors people will see -----------------------------------------------------------------
def test_k_larger_than_width():
    with pytest.raises(ValueError) as err:
        TopKSAE(576, 8, k=5000)
    assert str(err.value) == (
        "k=5000 is larger than the SAE width 4608 (expansion 8 x d_in 576); choose 1 <= k <= 4608"
    )
    with pytest.raises(ValueError, match="k=0"):
        TopKSAE(D_IN, EXPANSION, k=0)


def test_negative_l1_coef():
    with pytest.raises(ValueError, match=r"^l1_coef must be a finite number >= 0, got -1.0$"):
        ReluSAE(D_IN, l1_coef=-1.0)
    with pytest.raises(ValueError, match="nan"):
        ReluSAE(D_IN, l1_coef=float("nan"))


@pytest.mark.parametrize("kwargs, bad", [({"d_in": 0}, "0"), ({"d_in": 4, "expansion": 0}, "0"),
                                         ({"d_in": 4, "expansion": 1.5}, "1.5")])
def test_bad_sizes(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        ReluSAE(**kwargs)


def test_unknown_b_dec_method():
    with pytest.raises(ValueError, match="'medoid'.*mean, geometric_median"):
        make("standard").init_b_dec(torch.randn(10, D_IN), method="medoid")


def test_unknown_architecture_in_cfg(tmp_path):
    folder = make("topk").save(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matryoshka"}))
    with pytest.raises(ValueError, match="'matryoshka'.*'standard', 'topk', 'jumprelu', 'gated'"):
        load_sae(folder)


def test_unsupported_cfg_setting_is_refused(tmp_path):
    folder = make("topk").save(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    with pytest.raises(ValueError, match="apply_b_dec_to_input=False"):
        load_sae(folder)


def test_missing_folder_and_missing_weights(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_sae(missing)
    folder = make("standard").save(tmp_path / "sae")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_sae(folder)


# --- reproducibility and learning ----------------------------------------------------------
@pytest.mark.parametrize("cls", [ReluSAE, TopKSAE])
def test_seed_gives_reproducible_init(cls):
    a, b, c = cls(D_IN, seed=7), cls(D_IN, seed=7), cls(D_IN, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.W_dec, c.W_dec)


def sparse_synthetic_data(n: int = 512, d_in: int = 16, n_features: int = 32, active: int = 3):
    """Each row is a sum of a few random unit directions with positive weights, plus an offset."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(n_features, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    coefs = torch.zeros(n, n_features)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n)])
    coefs.scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return coefs @ dirs + 1.0


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_loss_decreases_with_adam(arch):
    torch.manual_seed(0)
    data = sparse_synthetic_data()
    sae = (ReluSAE(16, 4, l1_coef=1e-3, seed=0) if arch == "standard" else TopKSAE(16, 4, k=4, seed=0))
    sae.init_b_dec(data)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    with torch.no_grad():
        initial = sae(data).loss.item()
    for step in range(50):
        batch = data[torch.randint(0, len(data), (128,))]
        out = sae(batch)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
    with torch.no_grad():
        final = sae(data).loss.item()
    assert final < 0.5 * initial, (initial, final)


def test_topk_training_pass_matches_the_dense_one_in_value_and_gradient():
    # The sparse pass (embedding-bag decoder, b_dec folded through W_enc) must be the dense maths, reordered.
    sae = TopKSAE(16, 4, k=5, seed=3)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0.0, 1.0)  # negative pre-activations in some top-k sets: ReLU zeroes them
    x = torch.randn(2, 12, 16)

    def grads(forward):
        sae.zero_grad()
        out = forward(x)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in sae.named_parameters()}

    sparse, sparse_grads = grads(sae)
    dense, dense_grads = grads(lambda v: SparseAutoencoder.forward(sae, v))
    assert sparse.x_hat.shape == dense.x_hat.shape == x.shape and sparse.codes.shape == (2, 12, 64)
    torch.testing.assert_close(sparse.codes, dense.codes)
    for name in ("loss", "mse", "l1", "x_hat"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), rtol=1e-5, atol=1e-6)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # inference keeps the dense sums, identical to SAELens's
        assert torch.equal(sae(x).x_hat, SparseAutoencoder.forward(sae, x).x_hat)


def test_relu_training_pass_folds_b_dec_without_changing_values_or_gradients():
    sae = randomise(ReluSAE(16, 4, l1_coef=0.1, seed=3))
    x = torch.randn(32, 16)
    sae.zero_grad()
    out = sae(x)  # grad enabled: the folded encoder
    out.loss.backward()
    folded = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    codes = torch.relu(sae.pre_acts(x))  # the textbook (x - b_dec) @ W_enc + b_enc
    x_hat = codes @ sae.W_dec + sae.b_dec
    loss = (x_hat - x).pow(2).mean() + 0.1 * (codes * sae.W_dec.norm(dim=1)).sum(-1).mean()
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(folded[name], p.grad, rtol=1e-5, atol=1e-6)
