"""hawqc.ilp: Hutchinson traces, the bit-allocation ILP, ``hawqc search`` and the quality of its choices."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

import hawqc
from hawqc import data, quantize
from hawqc.bitconfig import BitConfig, LayerBits
from hawqc.cli import main
from hawqc.ilp.costs import layer_costs
from hawqc.ilp.sensitivity import folded_weights, hessian_traces, sensitivity
from hawqc.ilp.solver import (
    Budget,
    Problem,
    build_problem,
    read_latency_table,
    resnet_ties,
    solve,
)
from hawqc.models import get, quantizable_layers
from hawqc.models.resnet import BasicBlock, ResNet
from hawqc.quant.qat import accuracy, train_float

pytestmark = pytest.mark.xdist_group("ilp")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_hutchinson_matches_exact_hessian_trace_of_folded_weights(one_thread) -> None:
    torch.manual_seed(0)
    model = _Tiny()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.weight.data.uniform_(0.5, 2.0)
    model.eval()
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    fold = folded_weights(model)
    iters = 1000
    estimate, act_estimate, done = hessian_traces(model, [(x, y)], fold, tol=1e-9, max_iters=iters, seed=1,
                                                  activations=True)
    assert done == iters

    def check(name: str, loss, point: torch.Tensor, estimated: float) -> None:
        n = point.numel()
        hessian = torch.autograd.functional.hessian(loss, point).reshape(n, n).double()
        exact = hessian.diagonal().sum().item()
        # Rademacher probes: Var(vᵀHv) = 2 Σ_{j≠k} H_jk² (plus the other layers' shared-probe cross terms,
        # zero-mean); allow four standard errors
        stderr = (2 * (hessian.square().sum() - hessian.diagonal().square().sum())).sqrt().item() / iters**0.5
        assert abs(estimated - exact) <= 4 * stderr + 1e-6, (name, estimated, exact, stderr)
        assert stderr < 0.1 * abs(exact), "the check must be tight enough to catch a wrong scaling"

    # the weights: one Hessian over all folded weights, since each layer's estimate also carries zero-mean
    # cross terms with the other layers' probes: Var = 2 Σ_{j≠k in i} H_jk² + Σ_{j in i, k not in i} H_jk²
    names = list(fold)
    sizes = [fold[n][0].numel() for n in names]

    def weight_loss(flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split(sizes)
        weights = {f"{n}.weight": w.reshape(fold[n][0].shape) / fold[n][1] for n, w in zip(names, parts)}
        return F.cross_entropy(functional_call(model, weights, (x,)), y)

    hessian = torch.autograd.functional.hessian(weight_loss, torch.cat([fold[n][0].flatten() for n in names]))
    hessian = hessian.double()
    start = 0
    for name, size in zip(names, sizes):
        rows = hessian[start:start + size]
        block = rows[:, start:start + size]
        exact = block.diagonal().sum().item()
        within = 2 * (block.square().sum() - block.diagonal().square().sum())
        stderr = (within + rows.square().sum() - block.square().sum()).sqrt().item() / iters**0.5
        assert abs(estimate[name] - exact) <= 4 * stderr + 1e-6, (name, estimate[name], exact, stderr)
        assert stderr < 0.1 * abs(exact), "the check must be tight enough to catch a wrong scaling"
        start += size
    hidden = torch.relu(model.bn(model.conv(x))).flatten(1).detach()
    check("fc input", lambda h: F.cross_entropy(model.fc(h), y), hidden, act_estimate["fc"])
    check("conv input", lambda i: F.cross_entropy(model(i), y), x, act_estimate["conv"])


def test_micro_batches_give_the_same_weight_traces(one_thread) -> None:
    """Hessian-vector products summed over micro-batches: the same weight traces as one batch."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    x, y = torch.randn(12, 1, 6, 6), torch.randint(0, 4, (12,))
    fold = folded_weights(model)
    seen: list[int] = []
    whole, _ = hessian_traces(model, [(x, y)], fold, tol=1e-9, max_iters=6, seed=3)
    parts, iters = hessian_traces(model, [(x, y)], fold, tol=1e-9, max_iters=6, seed=3, micro_batch=5,
                                  progress=lambda k, total, mean, stderr: seen.append(k))
    assert iters == 6 and seen == [4, 6]  # progress once per block of iterations
    for name in fold:
        assert parts[name] == pytest.approx(whole[name], rel=1e-5)


def test_sensitivity_is_cached_and_orders_bits(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = _Tiny().eval()
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,)))]
    first = sensitivity(model, batches, max_iters=5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 1
    assert all(o[4] >= o[8] >= 0 for o in first.omega.values())
    assert any(o[4] > o[8] for o in first.omega.values())
    monkeypatch.setattr("hawqc.ilp.sensitivity.hessian_traces", lambda *a, **k: pytest.fail("cache not used"))
    assert sensitivity(model, batches, max_iters=5, cache_dir=tmp_path) == first


class _TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))).flatten(1))


def test_unlabelled_sensitivity_takes_soft_labels_and_positive_traces(tmp_path, one_thread) -> None:
    """Unlabelled inputs are labelled with the float model's softmax: the Hessian is then the Gauss-Newton
    matrix, and the Hutchinson samples lose the terms the loss gradient carries (argmax labels on inputs the
    model is unsure of give noisy, here negative, traces)."""
    torch.manual_seed(1)
    model = _TwoConv().eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        logits = model(x)
    found, spread = {}, {}
    for name, batches in (("unlabelled", [x]), ("soft", [(x, torch.softmax(logits, 1))]),
                          ("argmax", [(x, logits.argmax(1))])):
        seen: list[torch.Tensor] = []
        found[name] = sensitivity(model, batches, max_iters=30, tol=1e-9, cache_dir=tmp_path / name,
                                  progress=lambda k, total, mean, stderr: seen.append(stderr))
        spread[name] = seen[-1][:3]  # the three weight traces' standard errors
    assert found["unlabelled"].traces == pytest.approx(found["soft"].traces)
    assert all(t > 0 for t in found["unlabelled"].traces.values())
    assert any(t < 0 for t in found["argmax"].traces.values())
    assert bool((spread["unlabelled"] * 5 < spread["argmax"]).all())


def test_layer_costs_count_macs() -> None:
    costs = layer_costs(_Tiny(), (1, 6, 6))
    assert costs["conv"].params == 27 and costs["conv"].macs == 27 * 16
    assert costs["fc"].macs == 48 * 4


# ---- the ILP --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_problem() -> tuple[nn.Module, Problem]:
    torch.manual_seed(0)
    model = get("tiny_resnet").eval()
    rng = random.Random(0)
    omega = {n: {4: rng.random(), 8: rng.random() * 1e-2} for n in quantizable_layers(model)}
    return model, build_problem(model, (1, 28, 28), omega)


def test_ilp_meets_budgets_and_keeps_ties_and_pins(resnet_problem) -> None:
    model, problem = resnet_problem
    assert resnet_ties(model) == [["layer2.0.conv1", "layer2.0.downsample.0"],
                                  ["layer3.0.conv1", "layer3.0.downsample.0"]]
    low, high = problem.extremes("size")
    for fraction in (0.2, 0.5, 0.8):
        solution = solve(problem, [Budget.parse("size", fraction), Budget.parse("bops", "0.6")])
        assert solution.limits["size"] == pytest.approx(low + fraction * (high - low))
        assert solution.metrics["size"] <= solution.limits["size"]
        assert solution.metrics["bops"] <= solution.limits["bops"]
        bits = solution.bits
        assert bits["conv1"] == bits["fc"] == LayerBits(8, 8)
        assert bits["layer2.0.conv1"] == bits["layer2.0.downsample.0"]
        assert bits["layer3.0.conv1"] == bits["layer3.0.downsample.0"]
    loose, tight = (solve(problem, [Budget.parse("size", f)]) for f in (0.9, 0.3))
    assert loose.omega <= tight.omega
    assert BitConfig.from_dict(loose.bit_config().to_dict()).resolve(model) == loose.bits


def test_absolute_budgets_and_infeasible_message(resnet_problem) -> None:
    _, problem = resnet_problem
    low, _ = problem.extremes("size")
    assert Budget.parse("size", "2.5MiB") == Budget("size", 2.5 * 2**20, False)
    assert Budget.parse("latency", "0.5") == Budget("latency", 0.5, True)
    assert Budget.parse("bops", 3e9).fraction is False
    solution = solve(problem, [Budget.parse("size", f"{low / 1000 + 1}kB")])
    assert solution.metrics["size"] <= low + 1000
    with pytest.raises(ValueError, match=rf"smallest achievable is {low:,.0f} bytes") as err:
        solve(problem, [Budget.parse("size", f"{low - 1}B")])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="fraction in"):
        Budget.parse("size", "half")


def test_user_ties_and_free_ends() -> None:
    torch.manual_seed(0)
    model = get("tiny_resnet").eval()
    omega = {n: {4: 1.0, 8: 0.0} for n in quantizable_layers(model)}
    omega["layer1.0.conv1"] = {4: 100.0, 8: 0.0}
    omega["conv1"] = {4: 0.0, 8: 1.0}  # 4 bits is better here: pinned it would stay at 8
    problem = build_problem(model, (1, 28, 28), omega, ties=[["layer1.0.conv1", "layer1.0.conv2"]],
                            pin_first_last=None)
    solution = solve(problem, [Budget.parse("size", 0.3)])
    assert solution.bits["layer1.0.conv1"] == solution.bits["layer1.0.conv2"] == LayerBits(8, 8)
    assert solution.bits["conv1"].w_bits == 4  # W4A4 or W4A8: without activation Ω they tie on size


def _latency_table(path, layers, ms_per_bit: float = 0.25) -> None:
    rows = [{"layer": n, "workload": "w", "w_bits": b, "a_bits": b, "latency_ms": ms_per_bit * b, "stdev_ms": 0.0,
             "n_runs": 3, "schedule": "default", "target": "llvm", "device": "cpu", "tvm_version": "0.27",
             "date": "2026-01-01"} for n in layers for b in (4, 8)]
    path.write_text(json.dumps({"schema_version": 1, "rows": rows}))


def test_latency_budget_with_transition_cost(tmp_path, resnet_problem) -> None:
    model, _ = resnet_problem
    layers = quantizable_layers(model)
    _latency_table(tmp_path / "t.json", layers)
    table = read_latency_table(tmp_path / "t.json")
    omega = {n: {4: float(i + 1), 8: 0.0} for i, n in enumerate(layers)}
    plain = build_problem(model, (1, 28, 28), omega, latency=table)
    costly = build_problem(model, (1, 28, 28), omega, latency=table, transition_ms=0.6)
    budget = [Budget.parse("latency", "16ms")]
    with_cost = solve(costly, budget)
    assert with_cost.metrics["latency"] <= 16
    ignored = solve(plain, budget)
    choice = {n: costly.options.index(b) for n, b in ignored.bits.items()}
    assert costly.total("latency", choice) > 16, "transitions must matter in this setup"
    assert with_cost.omega > ignored.omega
    del table[layers[3], 4, 4]
    with pytest.raises(ValueError, match=rf"lacks 1 layer/bit pairs \(first: {layers[3]} W4A4\)"):
        build_problem(model, (1, 28, 28), omega, latency=table)


# ---- API and CLI ----------------------------------------------------------------------------------
def test_search_bit_config_api(digits_model, digits_loaders, tmp_path, one_thread) -> None:
    batches = list(digits_loaders[0])[:1]
    sens = sensitivity(digits_model, batches, max_iters=10, cache_dir=tmp_path)
    sens.save(tmp_path / "sens.json")
    config = hawqc.search_bit_config(digits_model, sensitivity=tmp_path / "sens.json", input_shape=(1, 8, 8), bops=0.5)
    bits = config.resolve(digits_model)
    assert {b.w_bits for b in bits.values()} == {4, 8}
    quantize(digits_model, config, [x for x, _ in batches])


def test_cli_search_writes_config_and_report(tmp_path, capsys) -> None:
    common = ["tiny_resnet", "--batch-size", "4", "--max-iters", "3", "--cache-dir", str(tmp_path)]
    out = tmp_path / "cfg.json"
    assert main(["search", *common, "--size", "0.5", "--pareto", "4", "-o", str(out),
                 "--report", str(tmp_path / "rep")]) == 0
    config = BitConfig.load(out)
    assert config.resolve(get("tiny_resnet"))["conv1"] == LayerBits(8, 8)
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.md", "pareto.png", "layers.png"}
    capsys.readouterr()
    for extra, message in ([[], "give at least one budget"], [["--latency", "0.5"], "needs a latency table"],
                           [["--size", "10B"], "smallest achievable is"], [["--bops", "lots"], "fraction in"]):
        assert main(["search", *common, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ---- the ILP's choices beat random ones -----------------------------------------------------------
def _random_configs(problem: Problem, metric: str, limit: float, count: int, rng: random.Random) -> list[dict[str, LayerBits]]:
    """``count`` configurations drawn uniformly from those meeting ``limit``: every free layer (tie group)
    at a uniformly random option, pins kept, draws over the budget rejected."""
    groups = [list(g) for g in problem.ties] + [[n] for n in problem.layers
                                                if n not in problem.pins and not any(n in g for g in problem.ties)]
    pinned = {n: problem.options.index(b) for n, b in problem.pins.items()}
    configs = []
    while len(configs) < count:
        choice = dict(pinned)
        for group in groups:
            k = rng.randrange(len(problem.options))
            choice.update((n, k) for n in group)
        if problem.total(metric, choice) <= limit:
            configs.append({n: problem.options[k] for n, k in choice.items()})
    return configs


FASHION_TRAIN_IMAGES, FASHION_EPOCHS, FASHION_TEST_IMAGES = 20000, 2, 2000
HESSIAN_BATCHES, HESSIAN_ITERS = 1, 50


@pytest.fixture(scope="module")
def fashion_net() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], DataLoader]:
    """A narrow ResNet (1 block per stage, 8/16/32 channels) trained on Fashion-MNIST, its calibration
    batches and the test images, on one torch thread."""
    try:
        train_set, test_set = data.fashion_mnist("train"), data.fashion_mnist("test")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        train = DataLoader(Subset(train_set, range(FASHION_TRAIN_IMAGES)), batch_size=128, shuffle=True,
                           generator=generator)
        model = ResNet(BasicBlock, [1, 1, 1], 10, 1, widths=(8, 16, 32), small_input=True)
        train_float(model, train, FASHION_EPOCHS)
    finally:
        torch.set_num_threads(threads)
    held_out = list(DataLoader(Subset(train_set, range(50000, 50000 + 4 * 128)), batch_size=128))
    return model.eval(), held_out, DataLoader(Subset(test_set, range(FASHION_TEST_IMAGES)), batch_size=1000)


def test_ilp_configs_beat_random_configs_at_equal_budget(fashion_net, tmp_path, one_thread) -> None:
    """The issue's criterion: at each budget the ILP's configuration has PTQ accuracy >= that of at least
    90% of 50 random configurations meeting the same budget (drawn uniformly among them, first and last
    layer pinned to 8-bit like the ILP), on Fashion-MNIST test images (fake-quant simulation)."""
    model, held_out, test = fashion_net
    sens = sensitivity(model, held_out[:HESSIAN_BATCHES], max_iters=HESSIAN_ITERS, cache_dir=tmp_path)
    problem = build_problem(model, (1, 28, 28), sens.omega, activation_omega=sens.activation_omega)
    calib = [x for x, _ in held_out]
    scores: dict[tuple, float] = {}

    def ptq_accuracy(bits: dict[str, LayerBits]) -> float:
        key = tuple(sorted((n, b.w_bits, b.a_bits) for n, b in bits.items()))
        if key not in scores:
            qmodel = quantize(model, BitConfig(layers=bits), calib)
            qmodel.mode = "fake"
            with torch.no_grad():
                scores[key] = accuracy(qmodel, test)
        return scores[key]

    rng = random.Random(0)
    beaten = {}
    for metric, fraction in (("size", 0.5), ("bops", 0.5)):
        solution = solve(problem, [Budget(metric, fraction, True)])
        ilp = ptq_accuracy(solution.bits)
        randoms = [ptq_accuracy(c) for c in _random_configs(problem, metric, solution.limits[metric], 50, rng)]
        beaten[metric, fraction] = sum(ilp >= r for r in randoms) / len(randoms)
    assert min(beaten.values()) >= 0.9, beaten
