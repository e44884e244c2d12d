"""The image-SSL losses against slow hand-written references, against lightly's, and across two
processes (DDP over gloo) against one process over the whole batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss

from multissl.losses.barlow_twins import barlow_twins_loss
from multissl.losses.dino import dino_loss, teacher_temperature, update_center
from multissl.losses.info_nce import enqueue, info_nce
from multissl.losses.negative_cosine import negative_cosine
from multissl.losses.vicreg import vicreg_loss
from tests.conftest import BIN, run
from tests.dist_image_losses import HALF, KINDS, build, step, teacher_outputs

SHAPES = [(n, d) for n in (2, 5, 8) for d in (3, 16)]
Scalars = list[torch.Tensor]


# ---- slow references: explicit loops over samples, pairs and dimensions, in float64 -------------

def _row(x: torch.Tensor, i: int) -> Scalars:
    return [x[i, d] for d in range(x.shape[1])]


def _dot(a: Scalars, b: Scalars) -> torch.Tensor:
    total = a[0] * b[0]
    for d in range(1, len(a)):
        total = total + a[d] * b[d]
    return total


def _unit(a: Scalars) -> Scalars:
    norm = torch.sqrt(_dot(a, a))
    return [v / norm for v in a]


def _log_sum_exp(values: Scalars) -> torch.Tensor:
    top = max(float(v.detach()) for v in values)
    total = torch.zeros((), dtype=values[0].dtype)
    for v in values:
        total = total + torch.exp(v - top)
    return top + torch.log(total)


def _cross_entropy(logits: Scalars, target: int) -> torch.Tensor:
    return _log_sum_exp(logits) - logits[target]


def _ref_info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float, queue: torch.Tensor | None,
                  offset: int) -> tuple[torch.Tensor, int]:
    """Query ``i``'s positive is key ``offset + i`` of ``keys`` (no queue) or key ``i`` (queue)."""
    n = query.shape[0]
    total, correct = torch.zeros((), dtype=query.dtype), 0
    for i in range(n):
        q = _unit(_row(query, i))
        if queue is None:
            logits = [_dot(q, _unit(_row(keys, j))) / temperature for j in range(keys.shape[0])]
            target = offset + i
        else:
            logits = [_dot(q, _unit(_row(keys, i))) / temperature]
            logits += [_dot(q, _row(queue, k)) / temperature for k in range(queue.shape[0])]
            target = 0
        total = total + _cross_entropy(logits, target)
        correct += all(float(logits[target].detach()) > float(v.detach()) for j, v in enumerate(logits) if j != target)
    return total / n, correct


def _ref_mean(z: torch.Tensor, d: int) -> torch.Tensor:
    total = z[0, d]
    for n in range(1, z.shape[0]):
        total = total + z[n, d]
    return total / z.shape[0]


def _ref_cov(a: torch.Tensor, b: torch.Tensor, i: int, j: int, denominator: int) -> torch.Tensor:
    """``sum_n (a_ni - mean_i)(b_nj - mean_j) / denominator``."""
    mi, mj = _ref_mean(a, i), _ref_mean(b, j)
    total = torch.zeros((), dtype=a.dtype)
    for n in range(a.shape[0]):
        total = total + (a[n, i] - mi) * (b[n, j] - mj)
    return total / denominator


def _ref_barlow(z1: torch.Tensor, z2: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, dims = z1.shape
    std1 = [torch.sqrt(_ref_cov(z1, z1, d, d, n) + 1e-5) for d in range(dims)]
    std2 = [torch.sqrt(_ref_cov(z2, z2, d, d, n) + 1e-5) for d in range(dims)]
    on = torch.zeros((), dtype=z1.dtype)
    off = torch.zeros((), dtype=z1.dtype)
    for i in range(dims):
        for j in range(dims):
            c = _ref_cov(z1, z2, i, j, n) / (std1[i] * std2[j])  # correlation of standardised dims
            if i == j:
                on = on + (1 - c) ** 2
            else:
                off = off + c**2
    return on + lam * off, on, off


def _ref_vicreg(z1: torch.Tensor, z2: torch.Tensor, lam: float, mu: float, nu: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, dims = z1.shape
    inv = torch.zeros((), dtype=z1.dtype)
    for i in range(n):
        for d in range(dims):
            inv = inv + (z1[i, d] - z2[i, d]) ** 2
    inv = inv / (n * dims)
    var = torch.zeros((), dtype=z1.dtype)
    cov = torch.zeros((), dtype=z1.dtype)
    for z in (z1, z2):
        for d in range(dims):
            var = var + torch.relu(1 - torch.sqrt(_ref_cov(z, z, d, d, n - 1) + eps)) / dims / 2
            for e in range(dims):
                if d != e:
                    cov = cov + _ref_cov(z, z, d, e, n - 1) ** 2 / dims
    return lam * inv + mu * var + nu * cov, inv, var, cov


def _ref_softmax(values: Scalars) -> Scalars:
    lse = _log_sum_exp(values)
    return [torch.exp(v - lse) for v in values]


def _ref_dino(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, ts: float,
              tt: float) -> torch.Tensor:
    total, pairs = torch.zeros((), dtype=center.dtype), 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            pair = torch.zeros((), dtype=center.dtype)
            for b in range(t.shape[0]):
                q = _ref_softmax([(t[b, k] - center[0, k]) / tt for k in range(t.shape[1])])
                logits = [s[b, k] / ts for k in range(s.shape[1])]
                lse = _log_sum_exp(logits)
                for k in range(t.shape[1]):
                    pair = pair - q[k] * (logits[k] - lse)
            total, pairs = total + pair / t.shape[0], pairs + 1
    return total / pairs


def _leaves(*shapes: tuple[int, ...], seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float32 leaves for the loss and float64 copies of them for the reference."""
    g = torch.Generator().manual_seed(seed)
    fast = [torch.randn(*s, generator=g).requires_grad_() for s in shapes]
    slow = [x.detach().double().requires_grad_() for x in fast]
    return fast, slow


def _close(got: torch.Tensor, want: torch.Tensor, **tol: float) -> None:
    torch.testing.assert_close(got.detach().double(), want.detach().double(), **({"rtol": 1e-4, "atol": 1e-5} | tol))


def _grads_close(fast: list[torch.Tensor], slow: list[torch.Tensor]) -> None:
    for f, s in zip(fast, slow):
        if s.grad is None:  # an input the loss does not use (DINO's lone global crop as student)
            assert f.grad is None
        else:  # float32 against float64: an absolute tolerance on the scale of the largest gradient
            # (a batch of 2 normalised by its own std gives gradients from 1e-5 to 20 in one tensor)
            _close(f.grad, s.grad, atol=max(1e-5, 2e-6 * float(s.grad.abs().max())))


# ---- InfoNCE ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize("k", [1, 7, 32])
def test_info_nce_with_queue_matches_reference(n: int, d: int, k: int) -> None:
    (q, key, queue), (q64, key64, queue64) = _leaves((n, d), (n, d), (k, d), seed=n + d + k)
    queue = torch.nn.functional.normalize(queue.detach(), dim=1)
    loss, correct = info_nce(q, key, 0.2, queue=queue)
    want, want_correct = _ref_info_nce(q64, key64, 0.2, queue.double(), 0)
    _close(loss, want)
    assert int(correct) == want_correct
    loss.backward()
    want.backward()
    _grads_close([q, key], [q64, key64])


@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize(("world", "rank"), [(1, 0), (3, 0), (3, 2)])
def test_info_nce_without_queue_scores_every_process_keys(n: int, d: int, world: int, rank: int) -> None:
    """MoCo v3: the gathered keys of all processes are the candidates, the positive at ``rank*N+i``.
    ``gather`` is faked here: this process's keys in their rank's slot among fixed others."""
    (q, keys), (q64, keys64) = _leaves((n, d), (world * n, d), seed=n * d + rank)
    own = slice(rank * n, (rank + 1) * n)
    others = torch.nn.functional.normalize(keys.detach(), dim=1)

    def gather(k: torch.Tensor) -> torch.Tensor:
        return torch.cat([others[: rank * n], k, others[(rank + 1) * n:]])

    local = keys[own].detach().requires_grad_()
    loss, correct = info_nce(q, local, 0.1, gather=gather, rank=rank)
    want, want_correct = _ref_info_nce(q64, keys64, 0.1, None, rank * n)
    _close(loss, want)
    assert int(correct) == want_correct
    loss.backward()
    want.backward()
    _close(q.grad, q64.grad)
    _close(local.grad, keys64.grad[own])


@pytest.mark.parametrize(("n", "d", "k"), [(2, 3, 8), (5, 16, 20), (8, 16, 8)])
def test_info_nce_queue_matches_lightly_memory_bank(n: int, d: int, k: int) -> None:
    """lightly's ``NTXentLoss`` with a memory bank is MoCo's loss with out0 the queries, out1 the
    keys, and its bank (``(K, D)`` rows) the queue, read before it enqueues this batch's keys."""
    g = torch.Generator().manual_seed(n + k)
    q, key = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    theirs = NTXentLoss(temperature=0.2, memory_bank_size=(k, d))
    theirs.memory_bank.bank = queue.clone()
    _close(info_nce(q, key, 0.2, queue=queue)[0], theirs(q.requires_grad_(), key))
    # its update (ptr 0, batch fits) is our enqueue of the normalised keys
    ptr = enqueue(queue, 0, torch.nn.functional.normalize(key, dim=1))
    _close(theirs.memory_bank.bank, queue)
    assert ptr == int(theirs.memory_bank.bank_ptr)


def test_enqueue_writes_a_ring_buffer() -> None:
    queue = torch.zeros(5, 2)
    keys = torch.arange(6.0).view(3, 2)
    assert enqueue(queue, 0, keys) == 3
    torch.testing.assert_close(queue[:3], keys)
    more = 10 + torch.arange(6.0).view(3, 2)
    assert enqueue(queue, 3, more) == 1          # rows 3, 4 then wraps to 0
    torch.testing.assert_close(queue[[3, 4, 0]], more)
    torch.testing.assert_close(queue[1:3], keys[1:])
    assert enqueue(queue, 1, torch.ones(4, 2)) == 0  # exactly to the end
    torch.testing.assert_close(queue[1:], torch.ones(4, 2))


@pytest.mark.parametrize(("size", "n", "ptr"), [(4, 4, 0), (4, 4, 3), (4, 7, 0), (4, 7, 2), (3, 10, 1)])
def test_enqueue_is_writing_keys_one_at_a_time(size: int, n: int, ptr: int) -> None:
    """Keys longer than the queue: the newest ``size`` survive, where one-by-one writes leave them."""
    keys = torch.arange(float(n)).view(n, 1).repeat(1, 2)
    want, p = torch.full((size, 2), -1.0), ptr
    for i in range(n):
        want[p] = keys[i]
        p = (p + 1) % size
    queue = torch.full((size, 2), -1.0)
    assert enqueue(queue, ptr, keys) == p
    torch.testing.assert_close(queue, want)


# ---- negative cosine ----------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_negative_cosine_matches_reference_and_lightly(n: int, d: int) -> None:
    (p, z), (p64, z64) = _leaves((n, d), (n, d), seed=n + d)
    loss = negative_cosine(p, z.detach())
    want = -sum(_dot(_unit(_row(p64, i)), _unit(_row(z64.detach(), i))) for i in range(n)) / n
    _close(loss, want)
    _close(loss, NegativeCosineSimilarity()(p, z))
    loss.backward()
    want.backward()
    _close(p.grad, p64.grad)
    assert z.grad is None  # the caller's detach is the stop-gradient
    byol = (torch.nn.functional.normalize(p, dim=1) - torch.nn.functional.normalize(z, dim=1)).pow(2).sum(1).mean()
    _close(byol, 2 + 2 * loss)


# ---- Barlow Twins -------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize("lam", [5e-3, 0.5])
def test_barlow_twins_matches_reference_and_lightly(n: int, d: int, lam: float) -> None:
    (z1, z2), (a, b) = _leaves((n, d), (n, d), seed=n * d)
    loss, parts = barlow_twins_loss(z1, z2, lam)
    want, on, off = _ref_barlow(a, b, lam)
    _close(loss, want)
    _close(parts["on_diagonal"], on)
    _close(parts["off_diagonal"], off)
    assert not parts["on_diagonal"].requires_grad
    _close(loss, BarlowTwinsLoss(lambda_param=lam)(z1, z2))  # one process: the same definition
    loss.backward()
    want.backward()
    _grads_close([z1, z2], [a, b])


# ---- VICReg -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize(("lam", "mu", "nu"), [(25.0, 25.0, 1.0), (1.0, 3.0, 10.0)])
def test_vicreg_matches_reference_and_lightly(n: int, d: int, lam: float, mu: float, nu: float) -> None:
    (z1, z2), (a, b) = _leaves((n, d), (n, d), seed=n + 3 * d)
    with torch.no_grad():  # some dimensions above and some below unit std, so the hinge matters
        z1 *= torch.linspace(0.3, 2.0, d)
        a *= torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    loss, parts = vicreg_loss(z1, z2, lam, mu, nu)
    want, inv, var, cov = _ref_vicreg(a, b, lam, mu, nu, 1e-4)
    _close(loss, want)
    for name, value in (("invariance", inv), ("variance", var), ("covariance", cov)):
        _close(parts[name], value)
        assert not parts[name].requires_grad
    _close(loss, VICRegLoss(lambda_param=lam, mu_param=mu, nu_param=nu)(z1, z2))
    loss.backward()
    want.backward()
    _grads_close([z1, z2], [a, b])


# ---- DINO ---------------------------------------------------------------------------------------

CROPS = [(2, 0), (2, 3), (1, 2), (3, 1)]


@pytest.mark.parametrize(("n", "k"), [(2, 3), (5, 16), (8, 16)])
@pytest.mark.parametrize(("n_global", "n_local"), CROPS)
def test_dino_loss_matches_reference(n: int, k: int, n_global: int, n_local: int) -> None:
    fast, slow = _leaves(*[(n, k)] * (n_global + n_local), seed=n + k + n_local)
    g = torch.Generator().manual_seed(n_global)
    teacher = [3 * torch.randn(n, k, generator=g) for _ in range(n_global)]
    center = torch.randn(1, k, generator=g)
    loss = dino_loss(fast, teacher, center, 0.1, 0.05)
    want = _ref_dino(slow, [t.double() for t in teacher], center.double(), 0.1, 0.05)
    _close(loss, want)
    loss.backward()
    want.backward()
    _grads_close(fast, slow)


def test_dino_loss_needs_a_pair() -> None:
    with pytest.raises(ValueError, match="pairs"):
        dino_loss([torch.randn(2, 3)], [torch.randn(2, 3)], torch.zeros(1, 3))


@pytest.mark.parametrize(("n_global", "n_local"), [(2, 0), (2, 4), (1, 3)])
def test_dino_loss_and_center_match_lightly(n_global: int, n_local: int) -> None:
    """lightly's ``DINOLoss`` scores with its stored centre (shape ``(1, 1, K)``) and then updates
    it inside ``forward``; our loss with the same centre, and ``update_center``, give both."""
    n, k = 6, 10
    g = torch.Generator().manual_seed(n_local)
    student = [torch.randn(n, k, generator=g) for _ in range(n_global + n_local)]
    teacher = [torch.randn(n, k, generator=g) for _ in range(n_global)]
    center = torch.randn(1, k, generator=g)
    theirs = DINOLoss(output_dim=k, teacher_temp=0.06, student_temp=0.2, center_momentum=0.8)
    theirs.center = center.view(1, 1, k).clone()
    _close(dino_loss(student, teacher, center, 0.2, 0.06), theirs(teacher, student, teacher_temp=0.06))
    _close(update_center(center, teacher, momentum=0.8), theirs.center.view(1, k))


def test_update_center_is_a_moving_average_of_the_teacher_mean() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 3, generator=g) for _ in range(2)]
    center = torch.randn(1, 3, generator=g)
    want = torch.empty(1, 3)
    for j in range(3):
        mean = sum(float(t[b, j]) for t in teacher for b in range(4)) / 8
        want[0, j] = 0.9 * float(center[0, j]) + 0.1 * mean
    got = update_center(center, teacher)
    assert got.shape == (1, 3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(update_center(center, teacher, momentum=1.0), center)


def test_teacher_temperature_warms_up_linearly() -> None:
    assert teacher_temperature(0, 10) == pytest.approx(0.04)
    assert teacher_temperature(5, 10) == pytest.approx(0.055)
    assert teacher_temperature(10, 10) == pytest.approx(0.07)
    assert teacher_temperature(1000, 10) == pytest.approx(0.07)
    assert teacher_temperature(0, 0) == pytest.approx(0.07)
    assert teacher_temperature(3, 4, start=0.1, end=0.2) == pytest.approx(0.175)
    steps = [teacher_temperature(s, 30) for s in range(31)]
    assert all(math.isclose(b - a, 0.001, abs_tol=1e-12) for a, b in zip(steps, steps[1:]))


# ---- two processes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("dist") / "r.pt"
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "tests/dist_image_losses.py", str(out)],
               timeout=300, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_give_one_process_gradient(two_process_result: dict[str, object], kind: str,
                                                 tmp_path: Path) -> None:
    """DDP over halves with ``gather_with_grad``: the gradient of one process over the whole batch,
    and not the average of the halves' own losses (the gather matters)."""
    model, x1, x2 = build()
    want = step(model, x1, x2, kind, None, 0)
    got = two_process_result[kind]
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    halves = []
    for r in range(2):
        model, x1, x2 = build()
        part = slice(r * HALF, (r + 1) * HALF)
        halves.append(step(model, x1[part], x2[part], kind, None, 0))
    assert any((halves[0][n] + halves[1][n] - 2 * v).abs().max() > 1e-3 for n, v in want.items())


def test_two_processes_share_the_global_center(two_process_result: dict[str, object]) -> None:
    center, teacher = teacher_outputs()
    want = update_center(center, teacher, momentum=0.9)
    first, second = two_process_result["centers"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, want)
