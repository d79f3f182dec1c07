import math
import threading

import numpy as np
import pytest
import torch

from defectflow.errors import ConfigError
from defectflow.heads.flows import ConditionalFlows, bf16_subnets, positional_encoding_2d
from defectflow.methods.base import native_bf16, use_bf16
from defectflow.methods import cflow
from defectflow.methods.cflow import CFlowConfig, FlowScorer, lr_factor, step_in_turn, train_flows
from defectflow.scoring import flow_anomaly_map, smooth, upsample


def test_positional_encoding_distinguishes_every_position() -> None:
    encoding = positional_encoding_2d(32, 6, 5)
    assert encoding.shape == (32, 6, 5)
    vectors = encoding.flatten(1).T
    distances = torch.cdist(vectors, vectors)
    assert (distances + torch.eye(30) * 10).min() > 1e-3
    # first half varies along the row only (encodes the column), second half along the column only
    assert torch.allclose(encoding[:16, 0], encoding[:16, 5])
    assert torch.allclose(encoding[16:, :, 0], encoding[16:, :, 4])
    with pytest.raises(ValueError):
        positional_encoding_2d(30, 4, 4)


def test_log_likelihood_is_exact_change_of_variables() -> None:
    torch.manual_seed(0)
    flows = ConditionalFlows([6], cond_dim=8, n_blocks=2)
    x = torch.randn(5, 6)
    cond = torch.randn(5, 8)
    z, log_det = flows.flows[0](x, c=[cond])
    expected = (-0.5 * (z**2).sum(1) - 3 * math.log(2 * math.pi) + log_det) / 6
    assert torch.allclose(flows.vector_log_likelihood(0, x, cond), expected, atol=1e-5)
    x_back, _ = flows.flows[0](z, c=[cond], rev=True)
    assert torch.allclose(x_back, x, atol=1e-4)


def test_grid_log_likelihood_equals_the_flow_vector_by_vector() -> None:
    """Inference computes each position's condition once for all images (grid_log_likelihood);
    it must give what the FrEIA forward gives for every (vector, condition) pair."""
    torch.manual_seed(0)
    flows = ConditionalFlows([6, 10], cond_dim=8, n_blocks=3)
    with torch.no_grad():
        for parameter in flows.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))  # not the initial (partly zero) weights
        features = torch.randn(3, 6, 4, 5)
        expected = flows.vector_log_likelihood(
            0, features.permute(0, 2, 3, 1).reshape(-1, 6), flows.condition(4, 5, features.device).repeat(3, 1)
        ).view(3, 4, 5)
        assert torch.allclose(flows.level_log_likelihood(0, features), expected, atol=1e-5)
        assert torch.allclose(flows.level_log_likelihood(0, features, chunk=20), expected, atol=1e-5)  # one image per chunk


def test_maps_have_feature_grid_shape() -> None:
    flows = ConditionalFlows([4, 8], cond_dim=8, n_blocks=1)
    out = flows([torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)])
    assert [o.shape for o in out] == [(2, 6, 6), (2, 3, 3)]


def test_flows_model_each_cells_neighbourhood_mean_in_training_and_in_scoring() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, 8, 7)
    flows = ConditionalFlows([3], cond_dim=8, n_blocks=1, neighbourhood=3)
    means = flows.neighbourhood_mean(features)
    assert torch.allclose(means[:, :, 2, 2], features[:, :, 1:4, 1:4].mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(means[:, :, 0, 0], features[:, :, :2, :2].mean(dim=(2, 3)), atol=1e-6)  # inside the grid only
    assert torch.allclose(means[:, :, 7, 6], features[:, :, 6:, 5:].mean(dim=(2, 3)), atol=1e-6)
    with torch.no_grad():
        scored = flows([features])[0]
        flows.neighbourhood = 1
        assert torch.equal(flows.neighbourhood_mean(features), features)
        assert torch.allclose(scored, flows([means])[0], atol=1e-6)  # the flow sees the means, not the cells
    flows.neighbourhood = 3
    seen: list[torch.Tensor] = []
    original = flows.vector_log_likelihood
    flows.vector_log_likelihood = lambda level, vectors, cond: seen.append(vectors.detach().clone()) or original(level, vectors, cond)
    train_flows(flows, [features], CFlowConfig(fiber_batch=16, epoch_vectors=112, meta_epochs=1, sub_epochs=1), progress=False)
    trained_on = torch.cat(seen)
    assert torch.equal(trained_on.sort(dim=0).values, means.permute(0, 2, 3, 1).reshape(-1, 3).sort(dim=0).values)


def test_training_lowers_nll_and_prefers_the_training_distribution() -> None:
    torch.manual_seed(0)
    features = [3.0 + 0.5 * torch.randn(6, 4, 4, 4)]
    flows = ConditionalFlows([4], cond_dim=8, n_blocks=2)
    config = CFlowConfig(fiber_batch=16, meta_epochs=3, sub_epochs=2, lr=5e-3)
    history = train_flows(flows, features, config, progress=False)
    assert history[-1] < history[0] - 0.5
    with torch.no_grad():
        normal = flows([3.0 + 0.5 * torch.randn(2, 4, 4, 4)])[0].mean()
        odd = flows([-3.0 + 0.5 * torch.randn(2, 4, 4, 4)])[0].mean()
    assert normal > odd + 1.0


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(step, 10, 4, 0.5) for step in range(40)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[4] > factors[0]  # warming up
    assert max(factors) <= 1.0
    assert factors[10] > factors[20] > factors[30] > 0  # cosine decay per meta-epoch
    assert factors[11] == factors[19]  # constant within a meta-epoch


def test_every_level_takes_the_same_steps_and_sees_all_its_vectors() -> None:
    """A coarse level (few vectors) gets as many steps as the finest one, in full shuffled passes."""
    torch.manual_seed(0)
    features = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 2, 2)]  # 128 and 8 vectors
    flows = ConditionalFlows([3, 5], cond_dim=8, n_blocks=1)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    original = flows.vector_log_likelihood

    def spy(level: int, vectors: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        seen[level].append(vectors.detach().clone())
        return original(level, vectors, cond)

    flows.vector_log_likelihood = spy  # type: ignore[method-assign]
    train_flows(flows, features, CFlowConfig(fiber_batch=16, epoch_vectors=64, meta_epochs=1, sub_epochs=2), progress=False)
    assert len(seen[0]) == len(seen[1]) == 2 * 4  # 64 vectors per level and epoch, 16 per step
    coarse = torch.cat(seen[1][:4])  # the first epoch: 8 passes over the coarse level's 8 vectors
    all_coarse = features[1].permute(0, 2, 3, 1).reshape(-1, 5)
    for start in range(0, 64, 8):
        assert torch.equal(coarse[start:start + 8].sort(dim=0).values, all_coarse.sort(dim=0).values)
    # a budget above the finest level's count is cut to it: every level then takes 128/16 steps
    seen = {0: [], 1: []}
    train_flows(flows, features, CFlowConfig(fiber_batch=16, epoch_vectors=10_000, meta_epochs=1, sub_epochs=1), progress=False)
    assert len(seen[0]) == len(seen[1]) == 8


def test_levels_trained_side_by_side_give_the_weights_of_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each level has its own optimizer and random stream, drawn from the seed: training the levels
    in parallel threads (the CPU default) gives the same flows and losses as training them in turn."""
    features = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 6, 2, 2)]
    config = CFlowConfig(fiber_batch=16, epoch_vectors=64, meta_epochs=2, sub_epochs=1)
    threads = torch.get_num_threads()
    results = {}
    for workers in (1, 3):
        monkeypatch.setattr(cflow, "level_workers", lambda device, levels, workers=workers: workers)
        torch.manual_seed(0)
        np.random.seed(0)  # FrEIA draws its soft permutations from numpy
        flows = ConditionalFlows([3, 5, 6], cond_dim=8, n_blocks=2)
        initial = [p.detach().clone() for p in flows.parameters()]
        callers: set[int] = set()
        original = flows.vector_log_likelihood

        def spy(level: int, vectors: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            callers.add(threading.get_ident())
            return original(level, vectors, cond)

        flows.vector_log_likelihood = spy  # type: ignore[method-assign]
        torch.set_num_threads(1)  # the same arithmetic in every worker either way
        try:
            history = train_flows(flows, features, config, progress=False)
        finally:
            torch.set_num_threads(threads)
        results[workers] = (history, [p.detach().clone() for p in flows.parameters()], len(callers))
    (history_1, weights_1, callers_1), (history_3, weights_3, callers_3) = results[1], results[3]
    assert callers_1 == 1 and callers_3 > 1  # the levels really ran in different threads
    assert history_1 == history_3
    assert all(torch.equal(a, b) for a, b in zip(weights_1, weights_3))
    assert not all(torch.equal(a, b) for a, b in zip(weights_1, initial))  # and training moved them


def test_each_level_keeps_the_schedule_of_the_levels_trained_in_turn() -> None:
    """Level 1 of 3, 4 steps an epoch: its first epoch was steps 4-7 of the sequence, its second 16-19."""
    assert [step_in_turn(step, 1, 3, 4) for step in range(8)] == [4, 5, 6, 7, 16, 17, 18, 19]
    every = sorted(step_in_turn(step, level, 3, 4) for level in range(3) for step in range(8))
    assert every == list(range(24))  # each step of the sequence belongs to exactly one level's step


def test_the_level_left_last_takes_the_cores_the_others_freed() -> None:
    """Two cores, three levels on two workers: the thread that trains the costliest level (the one
    that made the shares) gets both cores once the others are done; a pool thread keeps one
    throughout, even left last (a team grown in a second thread slows every team: CoreShares)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    cores = cflow.CoreShares(2, workers=2, levels=3)
    pool_shares: list[int] = []

    def pool_thread() -> None:
        cores.take_share()
        pool_shares.append(torch.get_num_threads())

    owner_shares: list[int] = []
    try:
        for _ in range(3):
            worker = threading.Thread(target=pool_thread)
            worker.start()
            worker.join()
            cores.take_share()
            owner_shares.append(torch.get_num_threads())
            cores.level_done()
    finally:
        torch.set_num_threads(threads)
    # with 3, 2 and 1 levels unfinished
    assert owner_shares == [1, 1, 2]
    assert pool_shares == [1, 1, 1]


def test_the_costliest_level_trains_in_the_main_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the calling thread's share grows (CoreShares), so the level that finishes last must be
    the one it trains."""
    monkeypatch.setattr(cflow, "level_workers", lambda device, levels: 2)
    trained_in: dict[int, str] = {}
    original = cflow.train_level

    def spy(flows: ConditionalFlows, level: int, *args: object, **kwargs: object) -> list[float]:
        trained_in[level] = threading.current_thread().name
        return original(flows, level, *args, **kwargs)

    monkeypatch.setattr(cflow, "train_level", spy)
    flows = ConditionalFlows([3, 7, 5], cond_dim=8, n_blocks=1)
    features = [torch.randn(2, 3, 4, 4), torch.randn(2, 7, 2, 2), torch.randn(2, 5, 2, 2)]
    train_flows(flows, features, CFlowConfig(fiber_batch=16, epoch_vectors=16, meta_epochs=1, sub_epochs=1), progress=False)
    assert trained_in[1] == threading.main_thread().name
    assert trained_in[0] != trained_in[1] and trained_in[2] != trained_in[1]


def test_level_workers_one_per_core_on_a_cpu_and_one_on_a_gpu() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cflow.level_workers(torch.device("cpu"), 3) == 2
        assert cflow.level_workers(torch.device("cpu"), 1) == 1
        assert cflow.level_workers(torch.device("cuda"), 3) == 1
    finally:
        torch.set_num_threads(threads)


def test_bf16_subnets_change_only_the_subnetworks_and_only_inside_the_block() -> None:
    torch.manual_seed(0)
    flows = ConditionalFlows([16], cond_dim=8, n_blocks=2)
    x, cond = torch.randn(64, 16), torch.randn(64, 8)
    exact = flows.vector_log_likelihood(0, x, cond)
    with bf16_subnets(flows):
        fast = flows.vector_log_likelihood(0, x, cond)
        z, _ = flows.flows[0](x, c=[cond])
    assert fast.dtype == z.dtype == torch.float32  # the coupling and the log-determinant stay float32
    assert not torch.equal(fast, exact) and torch.allclose(fast, exact, atol=0.05)
    assert torch.equal(flows.vector_log_likelihood(0, x, cond), exact)  # off again after the block


def test_train_precision_auto_follows_the_device() -> None:
    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)
    assert use_bf16("auto", cpu) == native_bf16(cpu)
    with pytest.raises(ConfigError, match="train_precision must be one of"):
        CFlowConfig(train_precision="fp16").validate()


@pytest.mark.parametrize(("capabilities", "native"), [
    ({"avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_bf16": False}, False),  # oneDNN would emulate bf16
    ({"avx512_f": True, "avx512_bf16": True}, True),
    ({"amx_bf16": True}, True),
    ({"architecture": "arm64", "bf16": True}, True),
    ({"avx2": True}, False),
])
def test_bf16_training_only_on_cpus_with_bf16_units(monkeypatch: pytest.MonkeyPatch, capabilities: dict, native: bool) -> None:
    """oneDNN reports bf16 support on any AVX-512 CPU and emulates it there, slower than fp32; auto
    must then train in fp32."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert native_bf16(torch.device("cpu")) is native
    assert use_bf16("auto", torch.device("cpu")) is native


def test_the_flow_map_at_half_resolution_is_the_smoothed_map_within_two_percent() -> None:
    """flow_map_stride 2 sums and smooths the levels at half size (sigma / 2) and upsamples once;
    after smoothing with sigma 4 there is no detail finer than that to lose."""
    torch.manual_seed(0)
    flows = ConditionalFlows([4, 4, 4], cond_dim=8, n_blocks=1)
    full, half = (FlowScorer(flows, (64, 96), 4.0, "top", stride) for stride in (1, 2))
    levels = [-torch.rand(2, 64 // s, 96 // s) * 3 for s in (8, 16, 32)]  # log-likelihoods of three strides
    expected = upsample(smooth(flow_anomaly_map(levels, half.level_reference, (32, 48)), 2.0), (64, 96))
    halved, reference = half.raw_map(levels), full.raw_map(levels)
    torch.testing.assert_close(halved, expected)
    assert halved.shape == reference.shape == (2, 64, 96)
    # random log-likelihoods, independent per grid cell, are the worst case; the largest
    # differences are at the border, where both resolutions reflect their padding
    difference, spread = (halved - reference).abs(), reference.max() - reference.min()
    assert difference.max() < 0.02 * spread and difference.mean() < 0.004 * spread
