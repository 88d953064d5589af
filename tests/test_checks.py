"""Every exercise check says yes to a right answer, no to wrong ones, and copes with no answer."""

import pytest
import torch

from textimg import checks
from textimg.data import HELDOUT


def test_compare(capsys):
    assert checks.compare("x", torch.ones(3), torch.ones(3))
    assert not checks.compare("x", torch.ones(3), torch.ones(3) + 1e-3)
    assert not checks.compare("x", torch.ones(3), torch.ones(4))
    assert "shapes differ" in capsys.readouterr().out


def test_num_compositions():
    assert checks.check_num_compositions((6 * 8 - len(HELDOUT)) * 2 * 9)
    assert not checks.check_num_compositions(6 * 8 * 2 * 9)  # forgot the held-out pairs
    assert not checks.check_num_compositions(None)


def test_caption_for(capsys):
    assert checks.check_caption_for("a big turquoise plus sign in the lower right", "cross", "cyan", "large",
                                    "bottom right")
    assert not checks.check_caption_for("a big cyan cross in the lower left", "cross", "cyan", "large",
                                        "bottom right")
    assert "position" in capsys.readouterr().out
    assert not checks.check_caption_for("a cat", "cross", "cyan", "large", "bottom right")
    assert not checks.check_caption_for(None, "cross", "cyan", "large", "bottom right")


def test_heldout_pairs():
    assert checks.check_heldout_pairs(list(HELDOUT))
    assert not checks.check_heldout_pairs(list(HELDOUT)[:-1])
    assert not checks.check_heldout_pairs(None)


def test_masked_mean(capsys):
    def right(tokens, mask):
        m = mask.unsqueeze(-1).float()
        return (tokens * m).sum(1) / m.sum(1)

    assert checks.check_masked_mean(right)
    assert not checks.check_masked_mean(lambda t, m: t.mean(1))
    assert "plain mean" in capsys.readouterr().out
    assert not checks.check_masked_mean(lambda t, m: t.sum(1))
    assert not checks.check_masked_mean(lambda t, m: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out
    assert not checks.check_masked_mean(None)


def test_cosine_similarity():
    def right(a, b):
        return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T

    assert checks.check_cosine_similarity(right)
    assert not checks.check_cosine_similarity(lambda a, b: a @ b.T)
    assert not checks.check_cosine_similarity(None)


def test_token_count(tiny_bert):
    text = "a tiny violet rhombus"
    n = len(tiny_bert.tokenizer.tokenize(text)) + 2  # [CLS] ... [SEP]
    assert checks.check_token_count(text, n, tiny_bert.tokenizer)
    assert not checks.check_token_count(text, n - 2, tiny_bert.tokenizer)
    assert not checks.check_token_count(text, None, tiny_bert.tokenizer)


@pytest.mark.parametrize("answer,ok", [(1, True), (0, False), (None, False)])
def test_nearest_caption(minilm, answer, ok):
    query = "a small red circle in the top left"
    candidates = ["a large blue square in the bottom right", "a tiny red disc in the upper left"]
    assert checks.check_nearest_caption(query, candidates, answer, minilm) is ok


def test_upsampled_size():
    assert checks.check_upsampled_size(32)
    assert not checks.check_upsampled_size(31)
    assert not checks.check_upsampled_size(None)


def test_masked_attention(capsys):
    def right(q, k, v, mask):
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        return torch.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), dim=-1) @ v

    def unmasked(q, k, v, mask):
        return torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v

    assert checks.check_masked_attention(right)
    assert not checks.check_masked_attention(unmasked)
    assert "padding tokens still get weight" in capsys.readouterr().out
    assert not checks.check_masked_attention(None)


def test_mse_minimiser():
    images = torch.rand(10, 3, 4, 4)
    assert checks.check_mse_minimiser(images.mean(0), images)
    assert not checks.check_mse_minimiser(images.median(0).values, images)
    assert not checks.check_mse_minimiser(images.mean(0)[0], images)
    assert not checks.check_mse_minimiser(None, images)


def test_self_attention_params():
    c, qk = 64, 8
    n = 2 * (c * qk + qk) + (c * c + c) + 1
    assert checks.check_self_attention_params(n, channels=64)
    assert not checks.check_self_attention_params(n - 1, channels=64)


def test_nearest_code(capsys):
    assert checks.check_nearest_code(lambda z, c: torch.cdist(z, c).argmin(1))
    assert not checks.check_nearest_code(lambda z, c: (z @ c.T).argmax(1))
    assert "largest dot product" in capsys.readouterr().out
    assert not checks.check_nearest_code(None)


def test_perplexity():
    def right(indices, k):
        p = torch.bincount(indices.flatten(), minlength=k).float()
        p = p[p > 0] / p.sum()
        return torch.exp(-(p * p.log()).sum()).item()

    assert checks.check_perplexity(right)
    assert not checks.check_perplexity(lambda i, k: float(len(torch.unique(i))))  # counts codes used
    assert not checks.check_perplexity(None)


def test_latent_bits():
    assert checks.check_latent_bits(16 * 16 * 8)
    assert not checks.check_latent_bits(16 * 16)
    assert not checks.check_latent_bits(None)


def test_d_loss(capsys):
    import torch.nn.functional as F

    assert checks.check_d_loss(lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean())
    naive = lambda r, f: -(torch.sigmoid(r).log().mean() + (1 - torch.sigmoid(f)).log().mean())  # noqa: E731
    assert not checks.check_d_loss(naive)  # inf at logit -30 in float32
    assert "from logits" in capsys.readouterr().out
    assert not checks.check_d_loss(lambda r, f: F.softplus(-r).mean() - F.softplus(f).mean())
    assert not checks.check_d_loss(None)


def test_g_loss_nonsaturating(capsys):
    import torch.nn.functional as F

    assert checks.check_g_loss_nonsaturating(lambda f: F.softplus(-f).mean())
    assert not checks.check_g_loss_nonsaturating(lambda f: -F.softplus(f).mean())  # the saturating one
    assert "saturating" in capsys.readouterr().out
    assert not checks.check_g_loss_nonsaturating(None)


def test_mismatch(capsys):
    def right(captions):
        return [next(c for c in captions if c != own) for own in captions]

    assert checks.check_mismatch(right)
    assert not checks.check_mismatch(lambda caps: caps[1:] + caps[:1])  # a roll can hit a repeat
    assert "never equal" in capsys.readouterr().out
    assert not checks.check_mismatch(None)


def test_optimal_d():
    assert checks.check_optimal_d(0.75)
    assert not checks.check_optimal_d(0.5)
    assert not checks.check_optimal_d(None)


def test_a_function_left_as_a_stub_is_no_answer(capsys):
    def stub(a, b):
        ...  # your code

    assert not checks.check_d_loss(stub)
    assert "body is still" in capsys.readouterr().out


def test_frechet_distance(capsys):
    def frechet(a, b):
        a, b = a.double(), b.double()
        sa, sb = torch.cov(a.T), torch.cov(b.T)
        root_trace = torch.linalg.eigvals(sa @ sb).sqrt().real.sum()
        return ((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * root_trace).item()

    assert checks.check_frechet_distance(frechet)
    assert not checks.check_frechet_distance(lambda a, b: (a.mean(0) - b.mean(0)).square().sum().item())
    assert "covariance term" in capsys.readouterr().out
    assert not checks.check_frechet_distance(lambda a, b: 1 / 0)
    assert not checks.check_frechet_distance(None)


def test_lerp_path():
    assert checks.check_lerp_path(lambda a, b, n: torch.stack([a + (b - a) * i / (n - 1) for i in range(n)]))
    assert not checks.check_lerp_path(lambda a, b, n: torch.stack([a + (b - a) * i / n for i in range(n)]))
    assert not checks.check_lerp_path(lambda a, b, n: a)


def test_paraphrase(minilm, capsys):
    from textimg.metrics import load_judge
    from textimg.pipeline import TextToImagePipeline

    pipe, judge = TextToImagePipeline.from_pretrained(text_encoder=minilm), load_judge()
    white_star = {"shape": "star", "color": "white", "size": "large", "position": "center"}
    assert checks.check_paraphrase("please draw one big white star right in the middle", white_star, pipe, judge)
    assert not checks.check_paraphrase("a large white star in the center", white_star, pipe, judge)
    assert "inside the caption grammar" in capsys.readouterr().out
    assert not checks.check_paraphrase("please draw one big white star right in the middle",
                                       {**white_star, "color": "red"}, pipe, judge)
    assert not checks.check_paraphrase("please draw a star", {"shape": "star"}, pipe, judge)
    assert not checks.check_paraphrase(None, None, pipe, judge)
