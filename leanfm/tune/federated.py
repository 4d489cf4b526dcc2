"""Federated fine-tuning of adapters with Flower: FedAvg over the adapter's parameters only.

    result = federated_finetune(make_model, LoraConfig(r=8), client_sets, held_out, FedConfig(rounds=3),
                                pad_id=0)
    result.rounds   # [{"round": 1, "eval_loss": ..., "bytes_down": ..., "bytes_up": ..., "bytes": ...}, ...]

Each client trains the adapter on its own examples for `local_steps` with leanfm's trainer, starting
from the global adapter, and sends back its adapter tensors; the server averages them weighted by
client example counts (Flower's FedAvg) and evaluates the new global adapter on a held-out set. Only
adapter tensors cross the wire; the base model never moves. Runs in Flower's simulation mode on one
machine (Ray actors as clients). `non_iid_split` makes skewed client datasets (Dirichlet over keys).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from leanfm.tune import api
from leanfm.tune.config import AdapterConfig, AdapterError
from leanfm.tune.data import Example
from leanfm.tune.trainer import TrainConfig, evaluate, train

__all__ = ["FedConfig", "FedResult", "federated_finetune", "non_iid_split"]


@dataclass(frozen=True)
class FedConfig:
    rounds: int = 3
    local: TrainConfig = field(default_factory=lambda: TrainConfig(steps=5, batch_size=4, lr=1e-3,
                                                                    schedule="constant"))
    client_cpus: float = 1.0  # Ray resources per simulated client
    total_cpus: int = 2

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise AdapterError(f"rounds must be >= 1, got {self.rounds}")


@dataclass
class FedResult:
    eval_loss_before: float
    rounds: list[dict[str, Any]]
    parameters: dict[str, torch.Tensor]  # the final global adapter (adapter_state_dict names)


def non_iid_split(examples: Sequence[Example], keys: Sequence[Hashable], n_clients: int, alpha: float = 0.5,
                  seed: int = 0, min_size: int = 1) -> list[list[Example]]:
    """Split by key with Dirichlet(alpha) client shares per key (small alpha: each client sees few keys).
    Clients left with fewer than `min_size` examples take some from the largest client."""
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for idx in groups.values():
        shares = rng.dirichlet([alpha] * n_clients)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for c, chunk in enumerate(np.split(np.array(idx), cuts)):
            parts[c].extend(chunk.tolist())
    for c in range(n_clients):
        while len(parts[c]) < min_size:
            donor = max(range(n_clients), key=lambda j: len(parts[j]))
            if len(parts[donor]) <= min_size:
                raise AdapterError(f"{len(examples)} examples cannot give {n_clients} clients {min_size} each")
            parts[c].append(parts[donor].pop())
    return [[examples[i] for i in p] for p in parts]


def _to_numpy(model: nn.Module) -> tuple[list[str], list[np.ndarray]]:
    state = api.adapter_state_dict(model)
    keys = sorted(state)
    return keys, [state[k].float().cpu().numpy().copy() for k in keys]


def _set(model: nn.Module, keys: list[str], arrays: list[np.ndarray]) -> None:
    api.load_adapter_state_dict(model, {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})


_WORKER: dict[str, nn.Module] = {}  # one model per simulation worker process, reused across rounds


def _client_app(make_model: Callable[[], nn.Module], adapter: AdapterConfig, client_sets, keys, local: TrainConfig,
                pad_id: int):
    from flwr.client import ClientApp, NumPyClient

    class AdapterClient(NumPyClient):
        def __init__(self, cid: int):
            self.cid = cid

        def fit(self, parameters, config):
            if "model" not in _WORKER:
                model = make_model()
                api.add_adapter(model, adapter, seed=0)
                _WORKER["model"] = model
            model = _WORKER["model"]
            _set(model, keys, parameters)
            rnd = int(config.get("round", 0))
            cfg = TrainConfig(**{**local.to_dict(), "seed": 1000 * rnd + self.cid})
            res = train(model, client_sets[self.cid], [], cfg, pad_id=pad_id, progress=False)
            return _to_numpy(model)[1], len(client_sets[self.cid]), {"train_tokens": res.train_tokens}

    def client_fn(context):
        return AdapterClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn)


def _server_app(model: nn.Module, keys, initial, eval_set, pad_id, rounds: int, log: list[dict]):
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    from leanfm.tune.loss import CausalLMLoss

    runner = CausalLMLoss(model)

    def evaluate_fn(rnd, arrays, config):
        _set(model, keys, arrays)
        loss = evaluate(runner, eval_set, pad_id)
        log.append({"round": rnd, "eval_loss": loss})
        return loss, {}

    class CountingFedAvg(FedAvg):
        """FedAvg that records the bytes of adapter tensors sent to and received from clients."""

        def configure_fit(self, server_round, parameters, client_manager):
            pairs = super().configure_fit(server_round, parameters, client_manager)
            for _, fit_ins in pairs:
                fit_ins.config["round"] = server_round
            self._down = sum(len(t) for _, ins in pairs for t in ins.parameters.tensors)
            return pairs

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise AdapterError(f"round {server_round}: {len(failures)} client(s) failed: {failures[0]!r}")
            up = sum(len(t) for _, r in results for t in r.parameters.tensors)
            log.append({"round": server_round, "bytes_down": self._down, "bytes_up": up, "bytes": self._down + up,
                        "clients": len(results)})
            return super().aggregate_fit(server_round, results, failures)

    def server_fn(context):
        strategy = CountingFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1,
                                  min_available_clients=1, initial_parameters=ndarrays_to_parameters(initial),
                                  evaluate_fn=evaluate_fn)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn)


def federated_finetune(make_model: Callable[[], nn.Module], adapter: AdapterConfig,
                       client_sets: list[list[Example]], eval_set: list[Example], config: FedConfig, *,
                       pad_id: int, verbose: bool = True) -> FedResult:
    """Run `config.rounds` of FedAvg over the adapter in Flower's simulation; prints bytes per round."""
    from flwr.simulation import run_simulation

    if any(len(s) < config.local.batch_size for s in client_sets):
        raise AdapterError(f"every client needs at least batch_size={config.local.batch_size} examples; sizes: "
                           f"{[len(s) for s in client_sets]}")
    server_model = make_model()
    api.add_adapter(server_model, adapter, seed=0)
    keys, initial = _to_numpy(server_model)
    log: list[dict[str, Any]] = []
    random.seed(0)
    run_simulation(server_app=_server_app(server_model, keys, initial, eval_set, pad_id, config.rounds, log),
                   client_app=_client_app(make_model, adapter, client_sets, keys, config.local, pad_id),
                   num_supernodes=len(client_sets),
                   backend_config={"client_resources": {"num_cpus": config.client_cpus, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": config.total_cpus, "include_dashboard": False}},
                   verbose_logging=False)
    rounds = _merge_log(log, config.rounds)
    if verbose:
        for r in rounds[1:]:
            print(f"round {r['round']}: held-out loss {r['eval_loss']:.4f}, {r['bytes']:,} bytes "
                  f"({r['bytes_down']:,} down + {r['bytes_up']:,} up, {r['clients']} clients)")
    return FedResult(rounds[0]["eval_loss"], rounds[1:], api.adapter_state_dict(server_model))


def _merge_log(log: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    by_round: dict[int, dict[str, Any]] = {}
    for entry in log:
        by_round.setdefault(entry["round"], {}).update(entry)
    missing = [r for r in range(n + 1) if "eval_loss" not in by_round.get(r, {})]
    if missing:
        raise AdapterError(f"the federated run did not finish: no evaluation for round(s) {missing}")
    return [by_round[r] for r in range(n + 1)]
