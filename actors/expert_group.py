"""ExpertGroup: the SwiGLU weights of its experts for every layer, run on the rows routers send.

Shape legend: N = rows received in a layer, H = hidden, I = expert intermediate size, L = layers,
E = experts.

The group has a fixed number of expert slots per layer (its weight memory); which expert sits in
each slot may differ per layer and change while it serves (live re-placement): `stage` reads the
weights of the experts it is to take from the checkpoint, in its own thread while steps go on,
and `commit`, which the engine sends between two steps, switches to them.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import ray
import torch

from actors.dispatch import MAX_EXPERTS_IN_COLUMN, group_exchange
from actors.worker import Worker
from model.checkpoint import Checkpoint
from model.moe import ExpertFFN
from protocol.expert_cost import fitted_line
from protocol.experts import Placement
from protocol.worker import WorkerSetup, WorkerSpec

Moves = dict[int, dict[int, int]]  # layer -> slot -> the expert to hold there
Staged = dict[tuple[int, int], tuple[int, dict[str, torch.Tensor]]]  # (layer, slot) -> expert, its weights
WEIGHTS = ("w1", "w2", "w3")
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)  # the sizes `calibrate` times: decode's few rows to prefill's many


class ExpertGroup(Worker):
    def __init__(self, spec: WorkerSpec, setup: WorkerSetup) -> None:
        config = setup.model
        if config.num_experts > MAX_EXPERTS_IN_COLUMN:
            raise ValueError(f"at most {MAX_EXPERTS_IN_COLUMN} experts are supported, got {config.num_experts}")
        super().__init__(spec, setup)
        self.num_routers = setup.config.cluster.routers
        self.num_groups = setup.config.cluster.expert_groups
        self.slots = [list(spec.experts) for _ in range(config.num_layers)]  # [L][slot] -> expert
        self._staged: dict[int, Staged] = {}  # re-placement number -> the weights read for it
        self.local_of = self._local_table()
        moves = moves_to(self.slots, setup.placement, spec.index)
        if moves:  # a replacement for a worker of a copy whose experts were re-placed since it started
            self._hold(self._read(moves))

    @torch.inference_mode()
    def calibrate(self, repeats: int = 5) -> tuple[float, float, str, int]:
        """(weight_s, row_s, lane, lanes there) of this device, measured as a step runs experts: one
        expert's FFN on each of CALIBRATION_ROWS rows, each call on the next layer's weights (none
        is still in a cache from the call before, as in a step), on the kernels a step would use
        at that size; the median of `repeats` at each size. The least-squares line through them:
        its slope is a row's compute, its value at 0 rows the read of the expert's weights. (A
        line: the split's model; where the kernels change at a size, it fits both.) The lane is
        what this group computes on (its GPU; on CPU its node, which has cores / threads of them)."""
        ffns = self.model.expert_ffns()
        h = self.config.hidden_size
        seconds: dict[int, list[float]] = {n: [] for n in CALIBRATION_ROWS}
        calls = 0
        for round_ in range(repeats + 1):  # the first warms up
            for n in CALIBRATION_ROWS:
                x = torch.randn(n, h, dtype=self.dtype, device=self.device)  # [n, H]
                local = torch.zeros(n, dtype=torch.long, device=self.device)  # [n] all to slot 0
                ffn = ffns[calls % len(ffns)]
                calls += 1
                start = time.perf_counter()
                ffn(x, local)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if round_:
                    seconds[n].append(time.perf_counter() - start)
        weight_s, row_s = fitted_line(list(CALIBRATION_ROWS), [statistics.median(seconds[n]) for n in CALIBRATION_ROWS])
        node = ray.get_runtime_context().get_node_id()
        if self.device.type == "cuda":
            return weight_s, row_s, f"{node}:{torch.cuda.get_device_properties(self.device).uuid}", 1
        return weight_s, row_s, node, max(1, len(os.sched_getaffinity(0)) // torch.get_num_threads())

    def _local_table(self) -> torch.Tensor:
        """[L, E] global expert id -> its slot here, per layer (-1: not held)."""
        table = torch.full((self.config.num_layers, self.config.num_experts), -1, dtype=torch.long)
        for layer, experts in enumerate(self.slots):
            table[layer, experts] = torch.arange(len(experts))
        return table.to(self.device)

    @ray.method(concurrency_group="load")  # beside the steps: their calls are not held up
    def stage(self, moves: Moves, number: int) -> int:
        """Read the weights of the experts to take (layer -> slot -> expert) from the checkpoint and
        keep them aside, as re-placement `number`, until `commit(number)`. Returns the experts staged.
        Kept by number: the next re-placement's weights may be read while this one's commit is
        still queued, and each commit must take its own."""
        staged = self._read(moves)
        self._staged[number] = staged
        return len(staged)

    def _read(self, moves: Moves) -> Staged:
        names = {(layer, slot, w): f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                 for layer, by_slot in moves.items() for slot, e in by_slot.items() for w in WEIGHTS}  # fmt: skip
        ckpt = Checkpoint(self.setup.config.model.checkpoint)
        read = dict(ckpt.read(sorted(set(names.values())), device=self.device, dtype=self.dtype))
        return {
            (layer, slot): (e, {w: read[names[layer, slot, w]] for w in WEIGHTS})
            for layer, by_slot in moves.items()
            for slot, e in by_slot.items()
        }

    def commit(self, number: int) -> None:
        """Hold re-placement `number`'s staged experts from the next step on (the engine calls it
        between steps, after its `stage` returned; a group with nothing to move has none)."""
        self._hold(self._staged.pop(number, {}))

    def drop(self, number: int) -> None:
        """Forget re-placement `number`'s staged weights: it was abandoned."""
        self._staged.pop(number, None)

    @torch.no_grad()
    def _hold(self, staged: Staged) -> None:
        ffns = self.model.expert_ffns()
        for (layer, slot), (expert, weights) in staged.items():
            for w in WEIGHTS:
                getattr(ffns[layer], w)[slot].copy_(weights[w])
            ffns[layer].expert_ids[slot] = expert
            self.slots[layer][slot] = expert
        self.local_of = self._local_table()

    def run_step(self, message: None) -> int:
        """Serve every layer of this step (the message is empty: rows and experts come over the
        data plane); returns the rows processed."""
        cfg, clock = self.config, self.clock
        clock.begin_step()
        total = 0
        misrouted = torch.zeros((), dtype=torch.bool, device=self.device)  # read once, after the layers
        for layer, ffn in enumerate(self.model.expert_ffns()):

            def compute(x: torch.Tensor, expert_ids: torch.Tensor, layer: int = layer, ffn: ExpertFFN = ffn) -> Any:
                with clock("expert_ffn"):
                    local = self.local_of[layer, expert_ids]  # [N]
                    misrouted.logical_or_(local.lt(0).any())
                    return ffn(x, local.clamp(min=0))

            with clock("exchange"):  # the wires; expert_ffn inside is charged to itself
                total += group_exchange(
                    cfg.hidden_size, self.dtype, self.device, self.num_routers, self.num_groups, self.data_plane,
                    compute,
                )  # fmt: skip
        if bool(misrouted):
            raise RuntimeError(f"{self.spec.name} received rows for an expert it does not hold")
        clock.end_step()
        return total

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"slots": self.slots}


def moves_to(slots: list[list[int]], placement: Placement, group: int) -> Moves:
    """The slots of `group` whose expert differs in `placement` from `slots`: layer -> slot -> expert."""
    moves: Moves = {}
    for layer, (held, wanted) in enumerate(zip(slots, (groups[group] for groups in placement), strict=True)):
        changed = {slot: e for slot, (h, e) in enumerate(zip(held, wanted, strict=True)) if h != e}
        if changed:
            moves[layer] = changed
    return moves
