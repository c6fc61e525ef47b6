"""Latent-sharded SAEs on real 2- and 3-process gloo groups equal unsharded ones.

Each world size starts one `torch.multiprocessing` group (`sharding_workers.py`) that trains every
architecture twice with the trainer's step function, sharded and unsharded, on the same batches.
200 latents over 3 processes also checks uneven shards (67, 67, 66).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from sharding_workers import ARCHITECTURES, D_IN, N_LATENTS, STEPS, run_sharding_checks

from hf_deepsae import DeepSAEConfig, DeepSAEModel
from hf_deepsae.training.latent_sharding import LatentShard
from hf_deepsae.training.sharded_state import model_from_state

pytestmark = pytest.mark.slow
WORLD_SIZES = (2, 3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"{w}-processes" for w in WORLD_SIZES])
def ranks(request, tmp_path_factory) -> list[dict]:
    """Every process's record (see `sharding_workers.train_both`)."""
    world_size = request.param
    out = tmp_path_factory.mktemp(f"sharding{world_size}")
    mp.start_processes(run_sharding_checks, args=(world_size, free_port(), str(out)),
                       nprocs=world_size, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sharded_training_has_the_unsharded_loss_and_metrics(ranks, architecture):
    for record in ranks:
        for reference, sharded in zip(record[architecture]["reference_metrics"],
                                      record[architecture]["sharded_metrics"], strict=True):
            torch.testing.assert_close(sharded, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sharded_training_chooses_exactly_the_same_latents(ranks, architecture):
    for record in ranks:
        chosen = zip(record[architecture]["reference_latents"],
                     record[architecture]["sharded_latents"], strict=True)
        for step, (reference, sharded) in enumerate(chosen):
            assert torch.equal(sharded, reference), f"step {step}"
        assert len(record[architecture]["sharded_latents"]) == STEPS


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sharded_training_ends_with_the_unsharded_weights(ranks, architecture):
    reference, gathered = (ranks[0][architecture][key] for key in
                           ("reference_state", "sharded_state"))
    assert gathered.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(gathered[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert all(record[architecture]["sharded_state"] is None for record in ranks[1:])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_shard_counts_dead_latents_and_trains_them_like_the_unsharded_run(ranks,
                                                                               architecture):
    for record in ranks:
        reference, sharded = record[architecture]["dead_latents"]
        assert torch.equal(sharded, reference)
    aux_losses = [metrics[3] for metrics in ranks[0][architecture]["sharded_metrics"]]
    assert max(aux_losses) > 0  # dead latents appeared and AuxK trained them


def test_each_process_holds_its_share_of_the_sae_and_optimizer_state(ranks):
    world_size = len(ranks)
    full_bytes = ranks[0]["shallow"]["bytes"][0]
    shard_bytes = [record["shallow"]["bytes"][1] for record in ranks]
    replicated = D_IN * 4 * 3  # b_dec and its two AdamW moments
    assert sum(shard_bytes) == full_bytes + (world_size - 1) * replicated
    row = (4 * D_IN + 3) * 4  # a latent: encoder and decoder rows with Muon momenta, bias + moments
    assert max(shard_bytes) <= (full_bytes - replicated) / world_size + replicated + row


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_sharded_checkpoint_is_an_ordinary_one_and_reloads_into_shards(ranks, architecture):
    checkpoint = ranks[0][architecture]["checkpoint"]
    state = checkpoint["saved"]
    per_process = [f"{kind}_state_{rank}.json" for kind in ("data", "rng")
                   for rank in range(len(ranks))]
    assert checkpoint["files"] == sorted([
        "trainer_state.json", "mlp/model.safetensors", "mlp/optimizer_0.json",
        "mlp/optimizer_0.safetensors", "mlp/scheduler_0.json", "mlp/dead_latents.json",
        "mlp/dead_latents.safetensors", *per_process,
        *(f"rng_state_{rank}.safetensors" for rank in range(len(ranks)))])
    reference = ranks[0][architecture]["reference_state"]
    sae = model_from_state(DeepSAEConfig(d_in=D_IN, n_latents=N_LATENTS, k=4, k_aux=6,
                                         **ARCHITECTURES[architecture]), state["model"])
    assert isinstance(sae, DeepSAEModel)
    assert {name: value.shape for name, value in state["model"].items()} == \
        {name: value.shape for name, value in reference.items()}
    assert state["dead_latents"]["tokens_since_fired"].shape == (sae.config.n_total_latents,)
    for optimizer_state in state["optimizers"]:
        for slot in optimizer_state["state"].values():
            for value in slot.values():
                assert not value.ndim or value.shape[0] in (N_LATENTS, 24, D_IN, 12, 8)
    reloaded = checkpoint["reloaded"]
    for part in ("model", "dead_latents"):
        for name, value in state[part].items():
            assert torch.equal(reloaded[part][name], value), name
    for before, after in zip(state["optimizers"], reloaded["optimizers"], strict=True):
        for index, slot in before["state"].items():
            for key, value in slot.items():
                assert torch.equal(after["state"][index][key], value), (index, key)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("rows", [N_LATENTS, 12], ids=["tall", "wide"])
def test_sharded_muon_orthogonalises_the_whole_matrix_not_each_shard(ranks, rows, dtype):
    """Equal to Muon on the whole matrix up to the iteration's rounding (fp32 whole matrices
    take the Gram formulation, ~1e-4 relative from the direct iteration the shards run); far
    from orthogonalising each shard alone."""
    step = 1e-2 * 0.2 * max(rows, D_IN) ** 0.5  # lr x Muon's scale: an update's element size
    bf16_step = step * 2**-8
    tolerance = bf16_step if dtype == "bfloat16" else step * 1e-3
    for record in ranks:
        steps = record["muon"][rows, dtype]
        torch.testing.assert_close(steps["sharded"], steps["reference"], rtol=0, atol=tolerance)
        assert (steps["naive"] - steps["reference"]).abs().max() > 10 * bf16_step


def test_sharded_saes_get_the_sharded_muon(ranks):
    assert all(record[name]["muon_optimizer"] == "ShardedMuon"
               for record in ranks for name in ARCHITECTURES)


def test_processes_that_disagree_all_fail_naming_the_difference(ranks):
    messages = [record["disagreement"] for record in ranks]
    assert all("disagree on the checkpoint to resume" in message for message in messages)
    assert all("step: 4 on process 0 but 8 on process 1" in message for message in messages)


def test_shard_sizes_cover_the_latents_once():
    shards = [LatentShard(N_LATENTS, rank, 3) for rank in range(3)]
    assert [(shard.start, shard.stop) for shard in shards] == [(0, 67), (67, 134), (134, 200)]
    with pytest.raises(ValueError, match="can't be sharded over 3 processes"):
        LatentShard(2, 0, 3)
