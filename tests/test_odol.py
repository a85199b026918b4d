"""ODOL (method page, section 4): definitions against hand computations and oracles, invariances, gradients, errors;
the OdolConfig of a variant and ODOL over chunks."""

import itertools
import math

import pytest
import torch
from torchvision.ops import box_iou

from detptq_mini.model import DenseOutputs, Detector, decode
from detptq_mini.odol import ChunkedOdol, OdolConfig, elementwise_iou, odol, odol_terms

COMBOS = list(itertools.product(("kl", "l2"), ("l1", "iou"), ("soft", "hard")))
SHAPES = ((16, 16), (8, 8), (4, 4))


def random_outputs(b=2, k=4, shapes=SHAPES, requires_grad=False) -> DenseOutputs:
    """Random dense outputs: logits ~ N(0, 2^2) (many locations above the 0.25 foreground threshold), ltrb > 0."""
    cls = tuple((2 * torch.randn(b, k, h, w)).requires_grad_(requires_grad) for h, w in shapes)
    box = tuple((0.5 + 2 * torch.rand(b, 4, h, w)).requires_grad_(requires_grad) for h, w in shapes)
    return DenseOutputs(cls, box)


def perturbed(out: DenseOutputs, sigma=0.3, requires_grad=False) -> DenseOutputs:
    cls = tuple((c.detach() + sigma * torch.randn_like(c)).requires_grad_(requires_grad) for c in out.cls)
    box = tuple((b.detach() * (1 + sigma * torch.rand_like(b))).requires_grad_(requires_grad) for b in out.box)
    return DenseOutputs(cls, box)


def clone(out: DenseOutputs) -> DenseOutputs:
    return DenseOutputs(tuple(c.clone() for c in out.cls), tuple(b.clone() for b in out.box))


def one_level(cls_logits, ltrb) -> DenseOutputs:
    """A single level of shape 1 x n from per-location lists: logits (n, K), ltrb (n, 4)."""
    c = torch.tensor(cls_logits, dtype=torch.float32).T[None, :, None, :]
    b = torch.tensor(ltrb, dtype=torch.float32).T[None, :, None, :]
    return DenseOutputs((c,), (b,))


# ---------------------------------------------------------------- definitions
@pytest.mark.parametrize("cls,loc,fg", COMBOS)
def test_identical_outputs_give_exactly_zero(cls, loc, fg):
    out = random_outputs()
    terms = odol_terms(out, clone(out), cls=cls, loc=loc, fg=fg)
    assert terms["cls"].item() == 0.0 and terms["loc"].item() == 0.0 and terms["total"].item() == 0.0


@pytest.mark.parametrize("cls,loc,fg", COMBOS)
def test_perturbed_outputs_are_positive_and_differentiable(cls, loc, fg):
    fp = random_outputs(requires_grad=True)  # fp is the target: no gradient may reach it
    q = perturbed(fp, requires_grad=True)
    terms = odol_terms(fp, q, cls=cls, loc=loc, fg=fg)
    assert terms["cls"].item() > 0 and terms["loc"].item() > 0
    terms["total"].backward()
    for t in q.cls + q.box:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(t.grad is None for t in fp.cls + fp.box)


@pytest.mark.parametrize("cls,loc,fg", COMBOS)
def test_invariant_to_batch_order(cls, loc, fg):
    fp = random_outputs(b=3)
    q = perturbed(fp)
    perm = torch.tensor([2, 0, 1])

    def permute(o):
        return DenseOutputs(tuple(c[perm] for c in o.cls), tuple(b[perm] for b in o.box))

    a = odol(fp, q, cls=cls, loc=loc, fg=fg)
    b = odol(permute(fp), permute(q), cls=cls, loc=loc, fg=fg)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kl_and_l2_match_a_hand_computation():
    # one level 1x1, K = 2
    zf, zq = [0.3, -2.0], [1.1, 0.5]
    fp, q = one_level([zf], [[1, 1, 1, 1]]), one_level([zq], [[1, 1, 1, 1]])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    kl = sum(sig(a) * math.log(sig(a) / sig(b)) + (1 - sig(a)) * math.log((1 - sig(a)) / (1 - sig(b)))
             for a, b in zip(zf, zq))
    l2 = sum((sig(a) - sig(b)) ** 2 for a, b in zip(zf, zq))
    assert odol_terms(fp, q, cls="kl")["cls"].item() == pytest.approx(kl, rel=1e-5)
    assert odol_terms(fp, q, cls="l2")["cls"].item() == pytest.approx(l2, rel=1e-5)
    # identical boxes: the total is the classification term alone
    assert odol(fp, q, cls="kl").item() == pytest.approx(kl, rel=1e-5)


def test_kl_is_finite_for_saturated_logits():
    fp, q = one_level([[40.0, -40.0]], [[1, 1, 1, 1]]), one_level([[-40.0, 40.0]], [[1, 1, 1, 1]])
    v = odol_terms(fp, q, cls="kl")["cls"].item()
    # KL(1 || sigmoid(-40)) = -log sigmoid(-40) ~ 40, and the same for the second class
    assert math.isfinite(v) and v == pytest.approx(80.0, rel=1e-4)


def test_l1_is_the_foreground_weighted_mean_over_locations():
    # two locations (1 level of 1x2), K = 1: weights sigmoid(zf)
    zf = [[1.0], [-0.5]]
    fp = one_level(zf, [[1, 2, 3, 4], [2, 2, 2, 2]])
    q = one_level([[0.0], [0.0]], [[1.5, 2, 3, 3], [2, 0, 2, 2]])  # |d|_1 = 1.5 and 2
    w = [1 / (1 + math.exp(-z[0])) for z in zf]
    expected = (w[0] * 1.5 + w[1] * 2.0) / (w[0] + w[1])
    assert odol_terms(fp, q, loc="l1")["loc"].item() == pytest.approx(expected, rel=1e-6)
    # hard weights at 0.25: both sigmoids (0.73, 0.38) are foreground -> the plain mean
    assert odol_terms(fp, q, loc="l1", fg="hard")["loc"].item() == pytest.approx(1.75, rel=1e-6)
    assert odol_terms(fp, q, loc="l1", fg="hard", fg_thresh=0.5)["loc"].item() == pytest.approx(1.5, rel=1e-6)
    # reduction="sum": the numerators, not divided by the number of locations or by sum w
    s = odol_terms(fp, q, cls="l2", loc="l1", reduction="sum")
    m = odol_terms(fp, q, cls="l2", loc="l1")
    assert s["cls"].item() == pytest.approx(2 * m["cls"].item(), rel=1e-6)
    assert s["loc"].item() == pytest.approx(w[0] * 1.5 + w[1] * 2.0, rel=1e-6)


def test_background_perturbations_barely_count_soft_and_not_at_all_hard():
    fp = random_outputs(b=1, k=4)
    for c in fp.cls:
        c.fill_(-10.0)  # background everywhere (p ~ 4.5e-5) ...
    fp.cls[1][0, 2, 3, 3] = 5.0  # ... but one foreground location (p ~ 0.993)

    def bump(lvl, y, x):
        q = clone(fp)
        q.box[lvl][0, :, y, x] += 1.0
        return q

    for fg in ("soft", "hard"):
        at_fg = odol_terms(fp, bump(1, 3, 3), fg=fg)["loc"].item()
        at_bg = odol_terms(fp, bump(0, 5, 5), fg=fg)["loc"].item()
        assert at_fg > 0.5
        if fg == "soft":
            assert 0 < at_bg < 1e-3 * at_fg
        else:
            assert at_bg == 0.0


def test_no_foreground_gives_zero_loc_with_hard_weights():
    fp = random_outputs()
    for c in fp.cls:
        c.fill_(-5.0)  # max p = 0.0067 < 0.25 everywhere
    q = perturbed(fp, requires_grad=True)
    terms = odol_terms(fp, q, fg="hard")
    assert terms["loc"].item() == 0.0 and terms["cls"].item() > 0
    terms["total"].backward()  # still differentiable through the class term
    assert all(torch.isfinite(t.grad).all() for t in q.cls)


def test_iou_term_is_in_unit_interval_and_matches_an_oracle():
    fp = random_outputs()
    q = perturbed(fp, sigma=1.0)
    for fg in ("soft", "hard"):
        v = odol_terms(fp, q, loc="iou", fg=fg)["loc"].item()
        assert 0 < v <= 1
    # disjoint boxes give the maximum, 1: fp spans x in c +- 0.1 s, q spans c + [1.0, 1.2] s
    def constant_boxes(ltrb):
        return DenseOutputs(fp.cls, tuple(torch.tensor(ltrb).view(1, 4, 1, 1).expand_as(b) for b in fp.box))

    apart = odol_terms(constant_boxes([0.1, 0.1, 0.1, 0.1]), constant_boxes([-1.0, 0.1, 1.2, 0.1]), loc="iou")
    assert apart["loc"].item() == 1.0
    # per-location IoU against torchvision's pairwise box_iou (its diagonal) on the decoded boxes
    _, bf = decode(fp)
    _, bq = decode(q)
    a, b = bf.reshape(-1, 4), bq.reshape(-1, 4)
    torch.testing.assert_close(elementwise_iou(a, b), box_iou(a, b).diagonal(), rtol=1e-5, atol=1e-6)


def test_elementwise_iou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 1, 1], [0, 0, 0, 0]])
    torch.testing.assert_close(elementwise_iou(a, b), torch.tensor([1 / 7, 1.0, 0.0]))


def test_lam_scales_the_loc_term():
    fp = random_outputs()
    q = perturbed(fp)
    for loc in ("l1", "iou"):
        t = odol_terms(fp, q, loc=loc)
        for lam in (0.0, 0.5, 3.0):
            torch.testing.assert_close(odol(fp, q, loc=loc, lam=lam), t["cls"] + lam * t["loc"])
        assert odol(fp, q, loc=loc, lam=0.0) == t["cls"]


def test_real_detector_outputs_with_a_noisy_copy():
    torch.manual_seed(0)
    model = Detector().eval()
    with torch.no_grad():
        fp = model(torch.rand(2, 3, 64, 64))
    q = DenseOutputs(tuple((c + 0.2 * torch.randn_like(c)).requires_grad_() for c in fp.cls),
                     tuple((b * (1 + 0.1 * torch.randn_like(b))).clamp_min(0).requires_grad_() for b in fp.box))
    for cls, loc, fg in COMBOS:
        assert odol(fp, clone(fp), cls=cls, loc=loc, fg=fg).item() == 0.0
        t = odol_terms(fp, q, cls=cls, loc=loc, fg=fg)
        assert torch.isfinite(t["total"]) and t["cls"].item() > 0, (cls, loc, fg)
        # an untrained head sits at its 0.01 class prior: no location passes the hard 0.25 threshold
        assert (t["loc"].item() == 0.0) if fg == "hard" else (t["loc"].item() > 0), (cls, loc, fg)
    odol(fp, q).backward()  # the defaults: KL + L1, soft weights
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in q.cls + q.box)


# --------------------------------------------------------------------- errors
def test_mismatched_outputs_raise():
    fp = random_outputs()
    with pytest.raises(ValueError, match="differ in shape"):
        odol(fp, random_outputs(shapes=((16, 16), (8, 8), (2, 2))))
    with pytest.raises(ValueError, match="differ in shape"):
        odol(fp, random_outputs(k=3))
    with pytest.raises(ValueError, match="differ in shape"):
        odol(fp, random_outputs(b=3))
    with pytest.raises(ValueError, match="levels"):
        odol(fp, random_outputs(shapes=SHAPES[:2]))
    with pytest.raises(ValueError, match="4 channels"):
        bad = DenseOutputs(fp.cls, tuple(b[:, :3] for b in fp.box))
        odol(bad, bad)
    with pytest.raises(ValueError, match="NaN"):
        q = clone(fp)
        q.cls[0][0, 0, 0, 0] = float("nan")
        odol(fp, q)
    with pytest.raises(ValueError, match="q_out must be a DenseOutputs"):
        odol(fp, torch.zeros(3))
    with pytest.raises(ValueError, match="strides"):
        two = random_outputs(shapes=SHAPES[:2])
        odol(two, clone(two), loc="iou")


@pytest.mark.parametrize("kwargs,name", [
    ({"cls": "js"}, "cls="), ({"loc": "giou"}, "loc="), ({"fg": "top1"}, "fg="), ({"reduction": "none"}, "reduction="),
    ({"lam": -1.0}, "lam="), ({"lam": float("inf")}, "lam="), ({"lam": float("nan")}, "lam="),
    ({"fg_thresh": 0.0}, "fg_thresh="), ({"fg_thresh": 1.5}, "fg_thresh="), ({"eps": 0.0}, "eps="),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    out = random_outputs(shapes=((4, 4),))
    with pytest.raises(ValueError, match=name) as e:
        odol(out, clone(out), **kwargs)
    if name in ("cls=", "loc=", "fg=", "reduction="):
        assert "allowed" in str(e.value)


# ---------------------------------------------------------------- the config
@pytest.mark.parametrize("kwargs, message", [
    ({"cls": "kl2"}, "cls='kl2' is not allowed; allowed: 'kl', 'l2'"),
    ({"loc": "giou"}, "loc='giou' is not allowed; allowed: 'l1', 'iou'"),
    ({"fg": "top1"}, "fg='top1' is not allowed; allowed: 'soft', 'hard'"),
    ({"lam": -1.0}, "lam=-1.0 must be a finite number >= 0"),
    ({"lam": float("nan")}, "lam=nan must be"),
    ({"fg_threshold": 1.0}, r"fg_threshold=1.0 must be a finite number in \(0, 1\)"),
    ({"fg_threshold": 0.0}, "fg_threshold=0.0 must be"),
])
def test_odol_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OdolConfig(**kwargs)


def test_odol_config_is_frozen_and_has_the_paper_defaults():
    c = OdolConfig()
    assert (c.cls, c.loc, c.fg, c.lam, c.fg_threshold) == ("kl", "l1", "soft", 1.0, 0.25)
    with pytest.raises(AttributeError):
        c.lam = 2.0


@pytest.mark.parametrize("cls,loc,fg", COMBOS)
def test_config_equals_the_keyword_arguments(cls, loc, fg):
    fp = random_outputs()
    q = perturbed(fp)
    a = odol_terms(fp, q, cls=cls, loc=loc, fg=fg, lam=0.5, fg_thresh=0.4)
    b = odol_terms(fp, q, config=OdolConfig(cls=cls, loc=loc, fg=fg, lam=0.5, fg_threshold=0.4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(odol(fp, q, cls=cls, loc=loc, fg=fg), odol(fp, q, config=OdolConfig(cls, loc, fg)))


def test_config_and_keyword_arguments_together_are_an_error():
    out = random_outputs(shapes=((4, 4),))
    with pytest.raises(ValueError, match="either config or the keyword arguments .*got config and loc"):
        odol(out, clone(out), loc="iou", config=OdolConfig())
    with pytest.raises(ValueError, match="config must be an OdolConfig"):
        odol(out, clone(out), config={"cls": "kl"})


# ------------------------------------------------------------ over chunks
def _cat(outs):
    return DenseOutputs(tuple(torch.cat(t) for t in zip(*[o.cls for o in outs])),
                        tuple(torch.cat(t) for t in zip(*[o.box for o in outs])))


@pytest.mark.parametrize("cls,loc,fg", COMBOS)
def test_chunked_odol_is_odol_on_one_chunk_and_on_the_concatenation(cls, loc, fg):
    torch.manual_seed(0)
    config = OdolConfig(cls=cls, loc=loc, fg=fg, lam=0.7)
    fp = [random_outputs(b=b) for b in (3, 1, 2)]
    q = [perturbed(o) for o in fp]
    one = ChunkedOdol(fp[:1], config)
    assert one(q[:1]) == float(odol(fp[0], q[0], config=config))  # exactly odol
    many = ChunkedOdol(fp, config)
    assert many(q) == pytest.approx(float(odol(_cat(fp), _cat(q), config=config)), rel=1e-5)


def test_chunked_odol_without_foreground_and_bad_arguments():
    fp = [random_outputs(b=1, shapes=((4, 4),)) for _ in range(2)]
    for o in fp:
        for c in o.cls:
            c.fill_(-10.0)  # no location above the hard threshold: L_loc is 0, as in odol
    q = [perturbed(o) for o in fp]
    config = OdolConfig(fg="hard")
    assert ChunkedOdol(fp, config)(q) == pytest.approx(float(odol(_cat(fp), _cat(q), config=config)), rel=1e-5)
    with pytest.raises(ValueError, match="fp_outs is empty"):
        ChunkedOdol([])
    with pytest.raises(ValueError, match="config must be an OdolConfig"):
        ChunkedOdol(fp, "kl")
    with pytest.raises(ValueError, match="q_outs has 1 chunks but the FP outputs have 2"):
        ChunkedOdol(fp)(q[:1])
