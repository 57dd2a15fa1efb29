"""TextSpan: planted ground truth, the covariance path against the data path, exact reconstruction."""
import torch

from nha_plugin.text import text_span
from conftest import assert_greedy_picks_agree


def _orthonormal(D, n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return q[:, :n].T.contiguous()                                   # (n, D)


def test_picks_planted_texts_in_order_of_variance():
    D = 16
    basis = _orthonormal(D, 3, 0)
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)
    data = (torch.randn(500, 3, generator=g, dtype=torch.float64) * scales) @ basis + 0.7 * basis[0]
    distractors = torch.nn.functional.normalize(torch.randn(40, D, generator=g, dtype=torch.float64), dim=1)
    texts = torch.cat([distractors[:20], basis[2:3], basis[0:1], distractors[20:], basis[1:2]])
    names = [f"t{i}" for i in range(len(texts))]
    res = text_span(data, texts, names, m=3, rank=8)
    assert res.indices.tolist() == [21, 42, 20]
    assert res.texts == ["t21", "t42", "t20"]
    assert (res.variances.diff() < 0).all()
    torch.testing.assert_close(res.reconstruction, data)             # the data lie in the picked span


def test_covariance_path_equals_data_path():
    g = torch.Generator().manual_seed(2)
    D, K, M = 12, 300, 60
    data = torch.randn(K, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    data = data + torch.randn(D, generator=g, dtype=torch.float64)
    texts = torch.nn.functional.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1)
    a = text_span(data, texts, m=5, rank=6)
    b = text_span(covariance=torch.cov(data.T, correction=0), mean=data.mean(dim=0), text_embeddings=texts, m=5, rank=6)
    assert_greedy_picks_agree(a, b, rtol=1e-7)


def test_full_rank_span_reconstructs_exactly():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(50, 6, generator=g, dtype=torch.float64)
    texts = torch.randn(30, 6, generator=g, dtype=torch.float64)
    res = text_span(data, texts, m=6, rank=6)
    torch.testing.assert_close(res.reconstruction, data)
    assert len(set(res.indices.tolist())) == 6
