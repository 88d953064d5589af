"""Every exercise says yes to a right answer and no to wrong ones, copes with no answer and with
broken code, and cannot be passed by handing in the package's own reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from textimg import checks
from textimg.checks import EXERCISES

# ---- right answers, one per exercise (the notebooks' solutions say the same in other words) ----


def masked_mean(tokens, mask):
    m = mask.unsqueeze(-1).float()
    return (tokens * m).sum(1) / m.sum(1)


def cosine(a, b):
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def masked_max(tokens, mask):
    return tokens.masked_fill(~mask[..., None], float("-inf")).max(dim=1).values


def attention(q, k, v, mask):
    scores = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def film(x, c, norm, film_layer):
    gamma, beta = film_layer(c)[:, :, None, None].chunk(2, dim=1)
    return norm(x) * (1 + gamma) + beta


def quantize(z_e, codebook, beta):
    dist = z_e.pow(2).sum(1, keepdim=True) - 2 * z_e @ codebook.T + codebook.pow(2).sum(1)
    indices = dist.argmin(1)
    e = codebook[indices]
    loss = F.mse_loss(e, z_e.detach()) + beta * F.mse_loss(z_e, e.detach())
    return z_e + (e - z_e).detach(), indices, loss


def ema_update(cluster_size, embed_sum, z, indices, decay, eps):
    K = cluster_size.shape[0]
    counts = torch.bincount(indices, minlength=K).float()
    cluster_size = decay * cluster_size + (1 - decay) * counts
    sums = torch.zeros_like(embed_sum).index_add_(0, indices, z)
    embed_sum = decay * embed_sum + (1 - decay) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def perplexity(indices, K):
    p = torch.bincount(indices.flatten(), minlength=K).float()
    p = p[p > 0] / p.sum()
    return torch.exp(-(p * p.log()).sum()).item()


def d_loss_cls(real, fake, wrong):
    return F.softplus(-real).mean() + 0.5 * (F.softplus(fake).mean() + F.softplus(wrong).mean())


def d_step(D, opt, x_real, x_fake, text, wrong_text):
    opt.zero_grad()
    real = D(x_real, text, wrong_text)
    fake = D(x_fake.detach(), text)
    loss = d_loss_cls(real.logits, fake.logits, real.wrong_logits)
    loss.backward()
    opt.step()
    return {"d_loss": loss.item()}


def g_step(G, D, opt, z, text):
    opt.zero_grad()
    D.requires_grad_(False)
    loss = F.softplus(-D(G(z, text), text).logits).mean()
    loss.backward()
    D.requires_grad_(True)
    opt.step()
    return {"g_loss": loss.item()}


def hinge(real, fake, wrong):
    return F.relu(1 - real).mean() + 0.5 * (F.relu(1 + fake).mean() + F.relu(1 + wrong).mean())


def mismatch(captions):
    return [next(c for c in captions[i + 1:] + captions[:i] if c != caption) for i, caption in enumerate(captions)]


def frechet(a, b):
    sa, sb = torch.cov(a.T.double()), torch.cov(b.T.double())
    root = torch.linalg.eigvals(sa @ sb).real.clamp(min=0).sqrt().sum()
    return ((a.double().mean(0) - b.double().mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * root).item()


def lerp(a, b, steps):
    w = torch.linspace(0, 1, steps).unsqueeze(1)
    return (1 - w) * a + w * b


def diversity(f):
    n = f.shape[0]
    return (torch.cdist(f, f).sum() / (n * (n - 1))).item()


def caption_writer(labels):
    from textimg.data import ATTRIBUTES

    w = {a: ATTRIBUTES[a][i] for a, i in labels.items()}
    return f"a {w['size']} {w['color']} {w['shape']} in the {w['position']}"


def bottom_row_count():
    from textimg.data import ATTRIBUTES, ShapesDataset

    labels = ShapesDataset(1000, split="train", seed=0).labels_tensor()
    words = [(ATTRIBUTES["size"][z], ATTRIBUTES["position"][p]) for z, p in labels[:, 2:].tolist()]
    return sum(z == "large" and p.startswith("bottom") for z, p in words)


SOLUTIONS = {
    "00.1": (6 * 8 - 6) * 2 * 9, "00.2": "a big turquoise plus sign in the lower right", "00.3": None,
    "00.4": caption_writer,
    "01.2": masked_mean, "01.3": cosine, "01.1": 12, "01.4": 0, "01.5": masked_max,
    "02.1": 32, "02.3": attention, "02.2": film, "02.5": 2 * (64 * 8 + 8) + 64 * 64 + 64 + 1,
    "03.1": quantize, "03.2": ema_update, "03.3": perplexity, "03.4": 16 * 16 * 9, "03.5": None,
    "04.2": d_loss_cls, "04.3": (d_step, g_step), "04.4": hinge, "04.5": mismatch, "04.1": 0.75,
    "05.1": frechet, "05.2": lerp, "05.3": diversity,
    "05.4": ("a crimson star, big, right in the middle", {"shape": "star", "color": "red", "size": "large",
                                                          "position": "center"}),
}


def solution(ex_id):
    if ex_id == "00.3":
        return bottom_row_count()
    if ex_id == "02.4":
        from textimg.exercises.generation import _mse_images

        return _mse_images().mean(0)
    if ex_id == "03.5":
        return lambda z, codebook: (F.normalize(z, dim=1) @ F.normalize(codebook, dim=1).T).argmax(1)
    return SOLUTIONS[ex_id]


def check(ex_id):
    return checks.Check(EXERCISES[ex_id])


ALL = checks.ids()


def test_every_notebook_has_at_least_four_exercises_and_ids_are_in_order():
    per_notebook = {}
    for i in ALL:
        per_notebook.setdefault(i[:2], []).append(i)
    assert sorted(per_notebook) == ["00", "01", "02", "03", "04", "05"]
    assert all(len(v) >= 4 for v in per_notebook.values())
    assert ALL == sorted(ALL)
    kinds = {EXERCISES[i].kind for i in ALL}
    assert kinds == {"build", "function", "value", "predict"}
    for nb in ("01", "02", "03", "04", "05"):  # every stage notebook: at least one build-it
        assert any(EXERCISES[i].kind == "build" for i in per_notebook[nb])


@pytest.mark.parametrize("ex_id", [i for i in ALL if i != "05.4"])
def test_the_right_answer_passes_and_no_answer_fails(ex_id, capsys):
    assert check(ex_id)(solution(ex_id)), capsys.readouterr().out
    assert f"✅ {ex_id}" in capsys.readouterr().out
    assert not check(ex_id)(None)
    assert "No answer yet" in capsys.readouterr().out


def test_a_prompt_beyond_the_grammar_is_scored_by_the_committed_pipeline(capsys):
    assert not check("05.4")(("a big red star in the center", {"shape": "star", "color": "red", "size": "large",
                                                                 "position": "center"}))
    assert "inside the caption grammar" in capsys.readouterr().out
    ok = check("05.4")(SOLUTIONS["05.4"])
    assert "of 8 images" in capsys.readouterr().out
    assert bool(ok) in (True, False)  # the pipeline decides; the wording only has to be outside the grammar


@pytest.mark.parametrize("ex_id", [i for i in ALL if EXERCISES[i].reference])
def test_handing_in_the_package_reference_fails(ex_id, capsys):
    """The reference (or a function calling it, or a saved name for it) raises while the check runs."""
    from textimg.checks import resolve

    reference = resolve(EXERCISES[ex_id].reference[0])
    if ex_id == "04.3":
        from textimg.gan import d_step as pkg_d
        from textimg.gan import g_step as pkg_g

        answer = (pkg_d, pkg_g)
    elif ex_id == "03.1":
        from textimg.vqvae import VectorQuantizer

        def answer(z_e, codebook, beta):  # delegates through the module
            vq = VectorQuantizer(codebook.shape[0], codebook.shape[1], beta).eval()
            out = vq(z_e.T.reshape(1, z_e.shape[1], -1, 1))
            return out.z_q.reshape(z_e.shape[1], -1).T, out.indices.flatten(), out.loss
    elif ex_id == "03.2":
        def answer(*args):
            raise NotImplementedError("textimg: the package's reference for the exercise being checked is out of "
                                      "reach")  # what calling VectorQuantizer._update raises
    elif ex_id == "02.2":
        from textimg.generator import ConditionalNorm2d

        def answer(x, c, norm, film):
            return ConditionalNorm2d.forward(type("L", (), {"norm": norm, "film": film})(), x, c)
    elif ex_id == "02.3":
        answer = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, :])  # noqa: E731
    elif ex_id == "05.1":
        answer = reference
    elif ex_id == "05.3":
        from textimg import metrics

        answer = lambda f: metrics.diversity(None, f)  # noqa: E731
    elif ex_id == "00.4":
        answer = reference
    else:
        answer = reference
    assert not check(ex_id)(answer)
    assert "package's own reference" in capsys.readouterr().out
    assert reference.__code__.co_name == reference.__name__  # restored after the check
    assert "out of reach" not in str(reference.__code__.co_consts)
    assert F.scaled_dot_product_attention is not checks._stub


def test_the_gan_steps_are_scored_alike_whatever_the_thread_counts():
    """The learner's kernel and the grader's scorer may run with different thread counts (a class graded
    with --jobs 2: one thread each); rounding must not cost the learner 04.3's points."""
    exercise, threads = EXERCISES["04.3"], torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        response = exercise.respond((d_step, g_step))
        torch.set_num_threads(2)
        ok, message = exercise.score(response)
    finally:
        torch.set_num_threads(threads)
    assert ok, message


def test_wrong_answers_fail_with_a_useful_message(capsys):
    assert not check("01.2")(lambda t, m: t.mean(1))
    assert "plain mean" in capsys.readouterr().out
    assert not check("01.2")(lambda t, m: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out
    assert not check("02.3")(lambda q, k, v, m: torch.softmax(q @ k.transpose(1, 2) / 2, -1) @ v)
    assert "padding" in capsys.readouterr().out

    def no_straight_through(z_e, codebook, beta):
        z_q, indices, loss = quantize(z_e, codebook, beta)
        return codebook[indices], indices, loss

    assert not check("03.1")(no_straight_through)
    assert "gradient" in capsys.readouterr().out
    assert not check("04.2")(lambda r, f, w: F.softplus(-r).mean() + F.softplus(f).mean() + F.softplus(w).mean())
    assert "0.5" in capsys.readouterr().out

    def d_step_no_detach(D, opt, x_real, x_fake, text, wrong_text):
        opt.zero_grad()
        real, fake = D(x_real, text, wrong_text), D(x_fake, text)
        d_loss_cls(real.logits, fake.logits, real.wrong_logits).backward()
        opt.step()
        return {}

    assert not check("04.3")((d_step_no_detach, g_step))
    assert "detach" in capsys.readouterr().out

    def g_step_no_zero_grad(G, D, opt, z, text):  # gradients pile up from one round to the next
        D.requires_grad_(False)
        F.softplus(-D(G(z, text), text).logits).mean().backward()
        D.requires_grad_(True)
        opt.step()
        return {}

    assert not check("04.3")((d_step, g_step_no_zero_grad))
    assert "zero G's gradients" in capsys.readouterr().out
    assert not check("04.5")(lambda caps: caps[1:] + caps[:1])
    assert not check("05.3")(lambda f: torch.cdist(f, f).mean().item())
    assert "itself" in capsys.readouterr().out
    assert not check("00.2")("a large cyan cross in the bottom right")
    assert "synonym" in capsys.readouterr().out


def test_hints_come_one_at_a_time(capsys):
    ex = EXERCISES["02.1"]
    checks._failures.pop("02.1", None)
    check("02.1")(31)
    out = capsys.readouterr().out
    assert "Hint 1" in out and "Hint 2" not in out
    check("02.1")(30)
    out = capsys.readouterr().out
    assert "Hint 1" in out and "Hint 2" in out and ex.hints[1] in out


def test_responses_are_recorded_for_the_grader_and_read_back_safely(tmp_path, monkeypatch):
    monkeypatch.setenv(checks.GRADING_ENV, str(tmp_path))
    check("01.2")(masked_mean)
    check("04.5")(lambda captions: captions[::-1])  # a list of lists of strings
    response = checks.read_response(tmp_path / "01.2.pt")
    assert checks.score_response(EXERCISES["01.2"], response)[0]
    assert isinstance(checks.read_response(tmp_path / "04.5.pt")[0][0], str)
    assert not checks.score_response(EXERCISES["01.2"], {"__error__": "delegated"})[0]
    assert not checks.score_response(EXERCISES["01.2"], "nonsense")[0]  # never raises


def test_an_answer_that_restores_the_reference_is_caught(capsys):
    from textimg.text import masked_mean as reference

    original = reference.__code__

    def sneaky(tokens, mask):
        reference.__code__ = original
        return reference(tokens, mask)

    assert not check("01.2")(sneaky)
    assert "changed the package's reference" in capsys.readouterr().out


def test_use_picks_the_learners_function_only_when_it_passed(capsys):
    def mine():
        return 1

    def ours():
        return 2

    assert checks.use(True, mine, ours, "thing") is mine
    assert checks.use(False, mine, ours, "thing") is ours
    assert "package's thing" in capsys.readouterr().out


def test_compare(capsys):
    assert checks.compare("x", torch.ones(3), torch.ones(3))
    assert not checks.compare("x", torch.ones(3), torch.ones(3) + 1e-3)
    assert not checks.compare("x", torch.ones(3), torch.ones(4))
    assert "shapes differ" in capsys.readouterr().out
