"""Several training processes come from params alone: the stage relaunches itself under torchrun."""

from __future__ import annotations

import sys

import pytest

from tokenbridge.config import ParamsError, RuntimeParams
from tokenbridge.flows.common import torchrun_command


def test_one_process_is_not_relaunched():
    assert torchrun_command(RuntimeParams(), "distill", [], {}) is None


def test_one_machine_with_eight_gpus_runs_a_standalone_torchrun():
    command = torchrun_command(RuntimeParams(processes_per_node=8, strategy="fsdp"), "distill",
                               ["--params", "p.yaml"], {})
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--standalone",
                       "-m", "tokenbridge", "distill", "--params", "p.yaml"]


def test_several_machines_join_the_first_machines_rendezvous():
    environ = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "1"}
    command = torchrun_command(RuntimeParams(processes_per_node=8, nodes=2), "distill", [], environ)
    assert command[3:] == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                           "--master-port", "29500", "-m", "tokenbridge", "distill"]


def test_several_machines_without_a_rendezvous_address_fail_naming_the_variables():
    with pytest.raises(ParamsError, match="MASTER_ADDR, MASTER_PORT, NODE_RANK"):
        torchrun_command(RuntimeParams(processes_per_node=8, nodes=2), "distill", [], {})
