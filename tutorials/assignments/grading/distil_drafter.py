"""distil_drafter: the distillation loss, its gradient, and the acceptance after train()."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from .core import BUG_HINTS, DESCRIPTIONS, Failure, check, test
from .distil_reference import acceptance, reference_loss, sample_sequences, step_losses
from .integrity import _check_imports

# =========================================================================================== distil_drafter

DESCRIPTIONS["distil_drafter"] = "distil a drafter that reaches a target acceptance rate"
DD = "distil_drafter"
MIN_ALPHA1, MIN_ALPHA2 = 0.6, 0.58  # untrained drafter: 0.39 / 0.39; reference solution: 0.67 / 0.66

DD_SHORTCUT = "library shortcut"
DD_LOSS = "loss does not match the definition"
DD_REVERSE_KL = "reverse KL"
DD_FORWARD_KL = "KL instead of cross-entropy"
DD_LABEL = "label off by one"
DD_LABEL_BACK = "label off by one (one row early)"
DD_HARD = "hard labels"
DD_TOKEN = "input token not advanced"
DD_TOKEN_SHIFT = "input token off by one"
DD_HIDDEN = "teacher hidden state at later steps"
DD_SUM = "steps summed, not averaged"
DD_POSITIONS = "invalid positions averaged"
DD_GRAD = "gradient differs from the reference"
DD_CONTEXT = "drafter sees K/V at its own position"
DD_HIDDEN0 = "wrong hidden state for step 1"
DD_VOCAB = "mean over the vocabulary"
DD_DETACHED = "detached graph"
DD_WEIGHTS = "wrong count in the average"
DD_SCALAR = "loss not a scalar"
DD_FROZEN = "target not frozen"
DD_ACCEPT = "acceptance too low"
DD_TRAIN = "train() worse than the given loop"


# fmt: off
BUG_HINTS.update({
    DD_REVERSE_KL: "the loss is the cross-entropy with the TARGET's probabilities, -sum_x p(x) log q(x) (forward, "
    "mass-covering); KL(q || p) is mode-seeking and trains a drafter that p accepts less often.",
    DD_FORWARD_KL: "use the cross-entropy -sum p log q (it differs from KL(p || q) by the target's entropy).",
    DD_LABEL: "step j at position p is scored against teacher row p + j - 1 (the distribution of token p + j).",
    DD_LABEL_BACK: "step j at position p is scored against teacher row p + j - 1.",
    DD_HARD: "the labels are the target's full distributions (teacher rows), not the sampled tokens.",
    DD_TOKEN: "step j at position p reads the embedding of token x[p + j - 1]: the input advances with j.",
    DD_TOKEN_SHIFT: "step j at position p reads token x[p + j - 1] (step 1 reads x[p]).",
    DD_HIDDEN: "step j > 1 reads the drafter's own previous hidden output, as at inference.",
    DD_SUM: "average the per-step losses over j = 1..k.",
    DD_POSITIONS: "average over the valid positions only: p >= 1 and p + j - 1 <= S - 1.",
    DD_CONTEXT: "the drafter at position p sees the target's K/V at positions < p (DraftDenseContext with qpos = p).",
    DD_HIDDEN0: "step 1 at position p reads the target's final hidden state at p - 1 (zeros at p = 0).",
    DD_VOCAB: "the cross-entropy SUMS over the vocabulary: -sum_x p(x) log q(x).",
    DD_DETACHED: "keep the graph: no .detach(), .item(), torch.no_grad() or re-wrapped hidden state between steps "
    "(the target's outputs may be detached, the drafter's may not).",
    DD_WEIGHTS: "average each draft step over ITS OWN valid positions (n_j = B (S - j) of them: fewer for later "
    "steps), then average the k step losses with weight 1/k each: not one mean pooled over every (step, position) "
    "pair, not a sum divided by another step's count or by all B S positions.",
    DD_SCALAR: "return one number, a 0-dim tensor: the mean over each step's valid positions (over the batch AND the "
    "sequence), then the mean over the steps; a mean over one axis only leaves a vector.",
    DD_TRAIN: "train() may change the hyper-parameters but must train as well as the given loop: zero the "
    "gradients every step (opt.zero_grad()), train every draft step (k >= 2), step the optimizer.",
    DD_FROZEN: "compute the target's outputs under torch.no_grad() (teacher() does) and never pass its parameters to "
    "the optimizer.",
})
# fmt: on


@test(DD, "write the loss yourself: import nothing from minimtp but minimtp.attention (DraftDenseContext), "
      "minimtp.sampling and minimtp.errors (minimtp.train is the answer); no dynamic imports.", bug=DD_SHORTCUT,
      gate=True)  # fmt: skip
def no_library_loss(mod):
    _check_imports(mod, ("minimtp.attention", "minimtp.sampling", "minimtp.errors"), DD_SHORTCUT)


_SETUP: dict = {}


def _distil_setup():
    """The frozen target (tutorial 09's), the data sampled from it (train: 48 sequences, held out: 16; S = 16), drawn
    as the engine draws them (``distil_reference.sample_sequences``; the library's engine needs the kv_rollback
    holes filled, this does not)."""
    if not _SETUP:
        from _tiny import tiny_target

        target = tiny_target(seed=0, mix=0.5).requires_grad_(False)
        g = torch.Generator().manual_seed(0)

        def batch(n, seed, gen=g):
            starts = torch.randint(2, target.config.vocab_size, (n, 1), generator=gen)
            return sample_sequences(target, starts, 15, seed)

        _SETUP.update(target=target, batch=batch, train=batch(48, 1), heldout=batch(16, 2))
    return _SETUP


def _fresh_drafter(seed=3):
    from _tiny import tiny_assistant

    return tiny_assistant(_distil_setup()["target"], seed=seed, correlate=False)


def _reference_loss(target, drafter, x, k) -> torch.Tensor:
    """The definition of distill_loss (float32), the grader's own: equal to ``minimtp.train.distill.distill_loss``
    (tests/test_assignments.py checks it), which is a hole in the student release."""
    return reference_loss(target, drafter, x, k)


# The classic mistakes: name -> what the loss then is. The hidden suite computes each one (LOSS_VARIANT, set when it
# is loaded); the public suite's fixed inputs (train[:4], drafter seed 3, k = 1, 2, 3) have their values stored here.
_LOSS_MISTAKES = {
    DD_REVERSE_KL: "the loss equals KL(q || p) (reverse KL: mode-seeking, the wrong direction)",
    DD_FORWARD_KL: "the loss equals KL(p || q) = CE - H(p): same gradient, but the definition is the CE",
    DD_LABEL: "the loss equals the one with labels one row late (teacher row p + j instead of p + j - 1)",
    DD_LABEL_BACK: "the loss equals the one with labels one row early (teacher row p + j - 2)",
    DD_HARD: "the loss equals the CE with the sampled next token x[p + j] (hard labels) instead of the target's "
    "distribution",
    DD_TOKEN: "the loss equals the one where every step reads token x[p] (the input does not advance with j)",
    DD_TOKEN_SHIFT: "the loss equals the one where step j reads token x[p + j] instead of x[p + j - 1]",
    DD_HIDDEN: "the loss equals the one where later steps read the TARGET's hidden state, not the drafter's own "
    "previous output (that is not what the drafter sees at inference)",
    DD_SUM: "the loss equals the SUM over draft steps (the definition averages them)",
    DD_POSITIONS: "the loss equals the mean over ALL positions (p = 0 and positions past the end included)",
    DD_CONTEXT: "the loss equals the one where the drafter at position p also sees the target's K/V at p (it must "
    "see positions < p only: at inference the target has not run at p yet)",
    DD_HIDDEN0: "the loss equals the one where step 1 at position p reads the target's hidden state at p instead of "
    "p - 1",
    DD_VOCAB: "the loss equals the cross-entropy averaged over the vocabulary instead of summed",
}
PUBLIC_LOSS_KS = (1, 2, 3)
PUBLIC_LOSS_TABLE = {  # the mistakes' losses on the public inputs (torch 2.13, float32; matched within 1e-4 rel)
    DD_REVERSE_KL: (1.521718, 1.517398, 1.51746),
    DD_FORWARD_KL: (1.350007, 1.347256, 1.349179),
    DD_LABEL: (4.332928, 4.339461, 4.335253),
    DD_LABEL_BACK: (4.282933, 4.284819, 4.291598),
    DD_HARD: (4.463162, 4.474094, 4.49294),
    DD_TOKEN: (4.331312, 4.334291, 4.329437),
    DD_TOKEN_SHIFT: (4.312693, 4.299815, 4.314943),
    DD_HIDDEN: (4.331312, 4.349692, 4.337964),
    DD_SUM: (4.331312, 8.655335, 12.98312),
    DD_POSITIONS: (4.334628, 4.326433, 4.323041),
    DD_CONTEXT: (4.321692, 4.322263, 4.323722),
    DD_HIDDEN0: (4.33622, 4.331989, 4.328966),
    DD_VOCAB: (0.06767675, 0.06761981, 0.0676204),
}
LOSS_VARIANT: Callable | None = None  # fn(target, drafter, x, k, mistake name) -> that mistake's loss (hidden suite)


def _public_loss_inputs():
    return _distil_setup()["train"][:4], 3


def _mistake(losses: dict[int, float], x, drafter_seed: int) -> tuple[str, str]:
    """The classic mistake whose loss equals the file's for every k, else (DD_LOSS, ...)."""
    close = lambda a, b: abs(a - b) <= 1e-4 * abs(b)
    px, pseed = _public_loss_inputs()
    public = drafter_seed == pseed and x.shape == px.shape and torch.equal(x, px)
    for name, text in _LOSS_MISTAKES.items():
        if public and set(losses) <= set(PUBLIC_LOSS_KS):
            vals = dict(zip(PUBLIC_LOSS_KS, PUBLIC_LOSS_TABLE[name]))
        elif LOSS_VARIANT is not None:
            drafter = _fresh_drafter(drafter_seed)
            with torch.no_grad():
                vals = {k: float(LOSS_VARIANT(_distil_setup()["target"], drafter, x, k, name)) for k in losses}
        else:
            break
        if all(close(losses[k], vals[k]) for k in losses):
            return name, text
    return DD_LOSS, "no classic mistake reproduces it"


def _step_losses(target, drafter, x: torch.Tensor, k: int) -> tuple[list[torch.Tensor], list[int]]:
    """L_j, the definition's loss of draft step j alone (mean CE over its valid positions; in the drafter's graph),
    and n_j, its number of valid positions, for j = 1..k; the definition is the mean of the L_j."""
    return step_losses(target, drafter, x, k)


def _flat_grad(loss, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]).double()


def _weights(mod, x: torch.Tensor, k: int, drafter_seed: int) -> tuple[str, str] | None:
    """DD_WEIGHTS if the file's loss is sum_j c_j L_j, value AND gradient, with weights c_j other than the
    definition's 1/k: the right per-step losses, averaged with the wrong counts. None if it is not such a loss (or
    cannot be differentiated)."""
    st = _distil_setup()
    target = st["target"]
    B, S = x.shape
    try:
        d_ref = _fresh_drafter(drafter_seed).train()
        d_got = _fresh_drafter(drafter_seed).train()
        loss = mod.distill_loss(target, d_got, x, mod.teacher(target, x), k)
        if not (torch.is_tensor(loss) and loss.dim() == 0 and loss.requires_grad):
            return None
        params = [p for p in d_ref.parameters() if p.requires_grad]
        got_params = [p for p in d_got.parameters() if p.requires_grad]
        g = _flat_grad(loss, got_params)
    except Exception:
        return None
    steps, n = _step_losses(target, d_ref, x, k)
    A = torch.stack([_flat_grad(L, params) for L in steps], 1)  # [P, k]: the gradient of every step's loss
    c = torch.linalg.lstsq(A, g.unsqueeze(1)).solution.squeeze(1)
    residual = float((A @ c - g).norm()) / max(float(g.norm()), 1e-30)
    value = float(sum(float(cj) * float(L.detach()) for cj, L in zip(c, steps)))
    c = [float(cj) for cj in c]
    if residual > 1e-3 or abs(float(loss.detach()) - value) > 1e-4 * abs(value):
        return None  # not a weighted mean of the right per-step losses
    if all(abs(cj - 1 / k) <= 1e-3 / k for cj in c):
        return None  # the definition's weights: nothing to say here
    close = lambda want: all(abs(cj - w) <= 1e-3 * abs(w) for cj, w in zip(c, want))
    if close([nj / sum(n) for nj in n]):
        how = (
            f"the weights are n_j / sum n = {', '.join(f'{nj}/{sum(n)}' for nj in n)}: ONE mean pooled over "
            "every (step, position) pair (sum of all CEs / total count), so the steps with more valid positions "
            "weigh more"
        )
    elif close([nj / (k * n[0]) for nj in n]):
        how = (
            f"every step's CE sum is divided by step 1's count n_1 = {n[0]}, not by its own n_j "
            f"({', '.join(map(str, n))})"
        )
    elif close([nj / (k * B * S) for nj in n]):
        how = f"every step's CE sum is divided by all B S = {B * S} positions, not by its n_j valid ones"
    else:
        how = "the per-step losses are right but are not averaged with weight 1/k each"
    cs = " + ".join(f"{cj:.4f} L_{j}" for j, cj in enumerate(c, start=1))
    return DD_WEIGHTS, (f"your loss is {cs} (value and gradient), where L_j is the mean CE over step j's n_j valid "
                        f"positions (n = {', '.join(map(str, n))}); the definition is their mean, weight 1/{k} = "
                        f"{1 / k:.4f} each: {how}")  # fmt: skip


def _check_scalar(loss, x: torch.Tensor, k: int) -> None:
    check(torch.is_tensor(loss), DD_SCALAR, lambda: f"distill_loss returned {type(loss).__name__}, not a tensor")
    check(loss.dim() == 0, DD_SCALAR, lambda: f"batch of {x.shape[0]} sequences of {x.shape[1]} tokens, k = {k}: "
          f"distill_loss returned a tensor of shape {list(loss.shape)}, not a scalar: a mean over one axis only "
          "(average over the batch AND the positions, then over the steps)")  # fmt: skip


def check_loss_value(mod, x: torch.Tensor, ks: tuple[int, ...], drafter_seed: int) -> None:
    st = _distil_setup()
    target = st["target"]
    drafter = _fresh_drafter(drafter_seed)
    got = {}
    with torch.no_grad():
        for k in ks:
            loss = mod.distill_loss(target, drafter, x, mod.teacher(target, x), k)
            _check_scalar(loss, x, k)
            got[k] = float(loss)
    for k in ks:
        with torch.no_grad():
            w = float(_reference_loss(target, drafter, x, k))
        if abs(got[k] - w) <= 1e-4 * abs(w):
            continue
        bug, why = _mistake(got, x, drafter_seed)
        if bug == DD_LOSS:
            bug, why = _weights(mod, x, k, drafter_seed) or (bug, why)
        raise Failure(bug, f"batch of {x.shape[0]} sequences of {x.shape[1]} tokens, k = {k}: loss {got[k]:.6f}, "
                      f"the definition gives {w:.6f}: {why}")  # fmt: skip


@test(DD, "distill_loss: step j at position p reads token x[p+j-1] (step 1 with the target's hidden state at p-1, "
      "later steps with the previous step's hidden output), runs at position p (K/V < p) and is scored with the "
      "cross-entropy -sum p log q against the target's distribution of token p+j = teacher row p+j-1; average over "
      "p >= 1 with p+j-1 <= S-1, then over j.", points=20, bug=DD_LOSS)  # fmt: skip
def loss_matches_definition(mod):
    x, seed = _public_loss_inputs()
    check_loss_value(mod, x, PUBLIC_LOSS_KS, seed)


def check_loss_gradient(mod, x: torch.Tensor, k: int, drafter_seed: int) -> None:
    """The gradient of the loss w.r.t. every drafter parameter must be the reference's (relative error <= 1e-3)."""
    import copy

    st = _distil_setup()
    target = st["target"]
    d_ref = _fresh_drafter(drafter_seed).train()
    d_got = copy.deepcopy(d_ref)
    loss = mod.distill_loss(target, d_got, x, mod.teacher(target, x), k)
    _check_scalar(loss, x, k)
    check(
        torch.is_tensor(loss) and loss.requires_grad,
        DD_DETACHED,
        "the loss does not depend on the drafter's parameters (no grad_fn): do not detach, do not use no_grad",
    )
    loss.backward()
    _reference_loss(target, d_ref, x, k).backward()
    check(all(p.grad is None for p in target.parameters()), DD_FROZEN, "the target received gradients: keep it frozen")
    worst = (0.0, "")
    for (name, p_ref), p_got in zip(d_ref.named_parameters(), d_got.parameters()):
        if p_ref.grad is None:
            continue
        ref_norm = float(p_ref.grad.norm())
        if p_got.grad is None:
            worst = max(worst, (float("inf"), name))
            continue
        rel = float((p_got.grad - p_ref.grad).norm()) / max(ref_norm, 1e-12)
        worst = max(worst, (rel, name))
    if worst[0] <= 1e-3:
        return
    with torch.no_grad():
        g, w = float(loss.detach()), float(_reference_loss(target, d_ref, x, k))
    if abs(g - w) <= 1e-4 * abs(w):
        # the right per-step losses averaged with the wrong counts can give a value within 1e-4 (a mean pooled over
        # every (step, position) pair) and a gradient that is not: name that before blaming a cut graph
        bug, why = _weights(mod, x, k, drafter_seed) or (
            DD_DETACHED,
            "the loss value is right and its gradient is no reweighting of the steps' gradients, so part of the "
            "graph was cut (a .detach(), .item(), no_grad or a hidden state re-wrapped between steps)",
        )
    else:  # the value differs too: name the mistake on the loss test's inputs
        px, pseed = _public_loss_inputs()
        with torch.no_grad():
            d = _fresh_drafter(pseed)
            losses = {kk: float(mod.distill_loss(target, d, px, mod.teacher(target, px), kk)) for kk in PUBLIC_LOSS_KS}
        bug, why = _mistake(losses, px, pseed)
        if bug == DD_LOSS:
            bug, why = _weights(mod, x, k, drafter_seed) or (DD_GRAD, "")
    grad_state = "no gradient" if worst[0] == float("inf") else f"relative error {worst[0]:.2e}"
    raise Failure(bug, f"k = {k}: the gradient of {worst[1]} differs from the reference's ({grad_state})"
                  + (f": {why}" if why else ""))  # fmt: skip


@test(DD, "the gradient of your loss w.r.t. the drafter's parameters must be the reference loss's: the same "
      "divergence (CE with the target's probabilities, not KL(q || p)), nothing detached between steps, the target "
      "frozen.", points=15, bug=DD_GRAD)  # fmt: skip
def loss_gradient_matches_reference(mod):
    check_loss_gradient(mod, _distil_setup()["train"][4:8], 2, 5)


@test(DD, "the loss must be differentiable w.r.t. the drafter's parameters (do not detach the drafter's logits or "
      "hidden states; DO keep the target frozen).", points=5, bug=DD_DETACHED)  # fmt: skip
def loss_has_gradients(mod):
    st = _distil_setup()
    target, x = st["target"], st["train"][:4]
    drafter = _fresh_drafter()
    drafter.train()
    loss = mod.distill_loss(target, drafter, x, mod.teacher(target, x), 2)
    _check_scalar(loss, x, 2)
    check(loss.requires_grad, DD_DETACHED, "the loss has no grad_fn")
    loss.backward()
    g1 = drafter.pre_projection.weight.grad
    check(g1 is not None and bool(torch.isfinite(g1).all()) and float(g1.abs().sum()) > 0, DD_DETACHED,
          "no gradient reached the drafter's pre-projection W_pre")  # fmt: skip
    check(all(p.grad is None for p in target.parameters()), DD_FROZEN, "the target received gradients: keep it frozen")


@torch.no_grad()
def _alphas(target, drafter, x) -> tuple[float, float]:
    """Exact acceptance of sampled drafts at temperature 1, E[sum_x min(p, q)], for draft steps 1 and 2
    (teacher-forced: step 2 reads the true next token and step 1's hidden state), over all valid positions
    (p >= 1, p + j - 1 <= S - 1)."""
    a1, a2 = acceptance(target, drafter, x, 2)
    return a1, a2


def check_acceptance_after_training(mod, heldout: torch.Tensor, drafter_seed: int = 3) -> str:
    st = _distil_setup()
    target = st["target"]
    drafter = _fresh_drafter(drafter_seed)
    before = _alphas(target, drafter, heldout)
    t0 = time.perf_counter()
    trained = mod.train(target, drafter, st["train"].clone())
    drafter = trained if trained is not None else drafter
    dt = time.perf_counter() - t0
    a1, a2 = _alphas(target, drafter.eval(), heldout)
    vars(mod).setdefault("__grader_trained__", {})[id(heldout)] = (a1, a2)
    info = f"alpha_1 {before[0]:.3f} -> {a1:.3f}, alpha_2 {before[1]:.3f} -> {a2:.3f}, training {dt:.1f}s"
    check(a1 >= MIN_ALPHA1 and a2 >= MIN_ALPHA2, DD_ACCEPT,
          f"{info}: need alpha_1 >= {MIN_ALPHA1} and alpha_2 >= {MIN_ALPHA2}")  # fmt: skip
    return info


@test(DD, f"after train(), exact acceptance (sampled drafts, T = 1) on held-out target samples must reach "
      f"alpha_1 >= {MIN_ALPHA1} (draft step 1) and alpha_2 >= {MIN_ALPHA2} (step 2). Check the loss first; then "
      "steps, learning rate and batch size.", points=30, bug=DD_ACCEPT)  # fmt: skip
def acceptance_after_training(mod):
    return check_acceptance_after_training(mod, _distil_setup()["heldout"])


TRAIN_SLACK = 0.01  # the acceptance train() may lose against the given loop


def _given_train(mod, target, drafter, data, steps=150, batch=16, lr=3e-3, k=2):
    """The skeleton's train() (given to every student), run with the file's own teacher() and distill_loss()."""
    g = torch.Generator().manual_seed(0)
    teach = mod.teacher(target, data)
    opt = torch.optim.Adam(drafter.parameters(), lr=lr)
    drafter.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        t_prob, t_hidden, kv = teach
        rows = (t_prob[idx], t_hidden[idx], {t: (kk[idx], vv[idx]) for t, (kk, vv) in kv.items()})
        loss = mod.distill_loss(target, drafter, data[idx], rows, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


def check_train_vs_given(mod, heldout: torch.Tensor, drafter_seed: int = 3) -> str:
    """train() may change the hyper-parameters, but must do at least as well as the given loop with the same loss:
    a training loop that never zeroes the gradients, or trains draft step 1 only, falls short."""
    st = _distil_setup()
    target = st["target"]
    trained = vars(mod).get("__grader_trained__", {})  # what the acceptance test measured on this held-out set
    if id(heldout) not in trained:
        with contextlib.suppress(Failure):
            check_acceptance_after_training(mod, heldout, drafter_seed)
    a1, a2 = vars(mod)["__grader_trained__"][id(heldout)]
    g1, g2 = _alphas(target, _given_train(mod, target, _fresh_drafter(drafter_seed), st["train"].clone()), heldout)
    info = f"your train(): alpha_1 {a1:.3f}, alpha_2 {a2:.3f}; the given loop with your loss: {g1:.3f}, {g2:.3f}"
    check(a1 >= g1 - TRAIN_SLACK and a2 >= g2 - TRAIN_SLACK, DD_TRAIN,
          f"{info}: train() must reach at least the given loop's acceptance (minus {TRAIN_SLACK}) on every draft "
          "step")  # fmt: skip
    return info


@test(DD, "train() may change the steps, learning rate or batch size, but must train every draft step as well as "
      "the given loop does with your loss (zero the gradients every step, call distill_loss with k >= 2, step the "
      "optimizer).", points=10, bug=DD_TRAIN)  # fmt: skip
def train_as_good_as_the_given_loop(mod):
    return check_train_vs_given(mod, _distil_setup()["heldout"])
