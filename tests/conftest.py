"""Fixtures: small recipes over the embedded model (it ships inside the package, so tests never reach
outside the repository), and tiny random MoE / encoder models written to a temporary folder."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

# Without a GPU the Triton kernels are tested in Triton's interpreter, which has to be chosen before
# Triton is first imported (its standard library is compiled or interpreted then): transformers imports it.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from compress.recipe import validate_recipe

SHARED_PREFECT = "COMPRESS_TEST_PREFECT"  # "temporary": no shared server; every process starts Prefect's own
_SERVER = pytest.StashKey[tuple]()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default, pyproject.toml): a worker a core, at most 4: many tests start processes of their own
    (servers, `compress run`), each importing torch and transformers."""
    return max(1, min(4, os.cpu_count() or 1))


# Modules that start servers or `compress` processes (a minute or more each on 2 cores), collected first: with the
# suite spread over workers a file at a time, the many short modules then fill the end instead of one long one
HEAVY_FIRST = ("test_workflow.py", "test_workers.py", "test_nproc.py", "test_interrupt.py", "test_target_split.py", "test_pipeline.py",
               "test_ui_browser.py", "test_output_race.py", "test_obs_fused.py", "test_gpu_kernels.py", "test_cast.py", "test_resume.py",
               "test_api.py", "test_qmoe.py", "test_steps.py", "test_deploy.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's own order kept


def pytest_configure(config):
    """One Prefect server for the whole session, before anything imports Prefect: every `compress run`
    in a subprocess would otherwise start Prefect's temporary server (about 25 s of a 45 s run on 2
    cores). The first-command test (test_pipeline.py) still runs without it."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get(SHARED_PREFECT) == "temporary":
        return
    import socket
    import tempfile
    import warnings

    from compress.errors import CompressError
    from compress.service.prefect import start_prefect_server

    root = Path(tempfile.mkdtemp(prefix="compress-tests-prefect-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    server_env = {"PREFECT_HOME": str(root / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    (root / "home").mkdir()
    try:
        server = start_prefect_server(url, root / "server.log", wait=180, extra_env=server_env)
    except CompressError as error:  # the tests still run, each process with its own temporary server
        warnings.warn(f"no shared Prefect server for the tests: {error}", stacklevel=1)
        return
    os.environ["PREFECT_API_URL"] = url
    config.stash[_SERVER] = (server, root)


def pytest_unconfigure(config):
    import shutil
    import signal

    server, root = config.stash.get(_SERVER, (None, None))
    if server is None:
        return
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # it runs in a session of its own
        try:
            server.wait(timeout=30)
        except Exception:
            os.killpg(server.pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


FAST = {
    "calibration": {"nsamples": 16, "seqlen": 128, "seed": 0, "batch_size": 8},
    "evaluate": {"seqlen": 128, "max_windows": 16, "batch_size": 8},
    "output": {"onnx": False},  # the ONNX export has its own tests
}


def fast_recipe(*stages: dict[str, Any], **sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(FAST)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["stages"] = list(stages)
    return data


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every byte the compressed model consists of: packed/ (weights, index, config), and model/ when written."""
    files = [f for folder in ("packed", "model") for f in sorted((out / folder).glob("*.safetensors"))]
    files += [out / folder / name for folder in ("packed", "model") for name in ("model.safetensors.index.json", "config.json")]
    return {str(f.relative_to(out)): f.read_bytes() for f in files if f.exists()}


def make_group_quant(rows: int, cols: int, bits: int, group_size: int, zero_kind: str = "integer", seed: int = 0):
    """A random group_quant weight: uniform codes, fp16-exact scales and zero points (integer or float16)."""
    from compress.formats import group_quant

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    return group_quant.pack(codes, *_random_statistics(g, rows, -(-cols // group_size), bits, zero_kind), bits, group_size, zero_kind)


def _random_statistics(g: torch.Generator, rows: int, groups: int, bits: int, zero_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-exact scales and zero points [rows, groups]: integers in [0, 2^bits) or float16 values in that range."""
    scale = (torch.rand(rows, groups, generator=g) * 0.1 + 0.01).half().float()
    if zero_kind == "integer":
        return scale, torch.randint(0, 2**bits, (rows, groups), generator=g).float()
    return scale, (torch.rand(rows, groups, generator=g) * (2**bits - 1)).half().float()


def make_sparse_quant(rows: int, cols: int, bits: int, group_size: int, n: int = 2, m: int = 4, zero_kind: str = "integer", seed: int = 0,
                      pattern: str | None = None):
    """A random N:M (or `pattern`, e.g. "unstructured") sparse, group-quantized weight: N of every M columns kept
    at random, uniform codes, fp16-exact statistics (integer or float16 zero points)."""
    from compress.formats import sparse_quant

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, cols // m, m, generator=g).argsort(-1) < n).reshape(rows, cols)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    scale, zero = _random_statistics(g, rows, -(-cols // group_size), bits, zero_kind)
    return sparse_quant.pack(mask, codes, scale, zero, bits, group_size, pattern or f"{n}:{m}", zero_kind)


def on_device(packed, device: str):
    """The same packed weight with its tensors on `device`."""
    return type(packed)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(packed).items()})


def graph_replay(call):
    """call()'s output when captured in a CUDA graph and replayed once (the tensor the graph wrote)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    graph.replay()
    torch.cuda.synchronize()
    return out


def exported_tensors(out: Path) -> dict[str, torch.Tensor]:
    """The weights an output's packed model computes with, dense (packed targets unpacked)."""
    from compress.deploy.packed_model import dense_tensors

    return dense_tensors(out / "packed")


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) checkpoint folder, by name."""
    from compress.model.checkpoint import CheckpointFiles

    files = CheckpointFiles(folder)
    return files.read(list(files.where))


@pytest.fixture(autouse=True, scope="session")
def compress_home(tmp_path_factory):
    """Step cache and tracking store of the test session, never the user's ~/.compress."""
    import os

    home = tmp_path_factory.mktemp("compress-home")
    previous = os.environ.get("COMPRESS_HOME")
    os.environ["COMPRESS_HOME"] = str(home)
    # a resume point after every block, as the resume tests expect (a user's default is one a minute)
    os.environ.setdefault("COMPRESS_CHECKPOINT_SECONDS", "0")
    yield home
    if previous is None:
        os.environ.pop("COMPRESS_HOME", None)
    else:
        os.environ["COMPRESS_HOME"] = previous


@pytest.fixture
def recipe_from():
    def build(*stages: dict[str, Any], **sections: Any):
        return validate_recipe(fast_recipe(*stages, **sections), name="test")

    return build


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from compress.model.load import embedded_model_path

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-mixtral")
    MixtralForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compress.model.load import embedded_model_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


FAULT_FLAG = "COMPRESS_TEST_FAULT_FLAG"


@pytest.fixture(scope="session")
def fault_method() -> str:
    """A real method (RTN) that fails while the file named by $COMPRESS_TEST_FAULT_FLAG exists: the
    injected fault of the resume tests. Registered once per session; returns its recipe name."""
    import os

    from compress.methods.registry import _METHODS, register
    from compress.methods.rtn import RTN

    name = "rtn-with-fault"
    if name not in _METHODS:

        class RTNWithFault(RTN):
            def compress_target(self, weight, statistics, mask, dense=None):
                flag = os.environ.get(FAULT_FLAG)
                if flag and Path(flag).exists():
                    raise RuntimeError(f"injected fault ({flag} exists)")
                return super().compress_target(weight, statistics, mask, dense)

        RTNWithFault.name = name
        register(RTNWithFault)
    return name


KILL_AT = "COMPRESS_TEST_KILL_AT"


def register_kill_method(base: str = "gptq") -> str:
    """A real method (`base`) that SIGKILLs its own process on its Nth target, N from
    $COMPRESS_TEST_KILL_AT: a run dying mid-stage, for the resume-inside-a-stage tests."""
    import os
    import signal

    from compress.methods.registry import _METHODS, get_method, register

    name = f"{base}-with-kill"
    if name not in _METHODS:
        parent = get_method(base)
        calls = [0]

        def count_target():
            calls[0] += 1
            if os.environ.get(KILL_AT) == str(calls[0]):
                os.kill(os.getpid(), signal.SIGKILL)

        def compress_target(self, weight, statistics, mask, dense=None):
            count_target()
            return parent.compress_target(self, weight, statistics, mask, dense)

        def compress_siblings(self, weights, statistics, masks):  # siblings taken together count one target each
            for _ in weights:
                count_target()
            return parent.compress_siblings(self, weights, statistics, masks)

        from compress.methods.base import TargetMethod

        cores = {"compress_target": compress_target}
        if parent.compress_siblings is not TargetMethod.compress_siblings:
            cores["compress_siblings"] = compress_siblings
        register(type(f"{parent.__name__}WithKill", (parent,), {"name": name, **cores}))
    return name


SLEEP = "COMPRESS_TEST_SLEEP"


def register_slow_method(base: str = "gptq") -> str:
    """A real method (`base`) that sleeps $COMPRESS_TEST_SLEEP seconds before each target: a run that
    is reliably mid-stage when a test interrupts it."""
    import os
    import time

    from compress.methods.registry import _METHODS, get_method, register

    name = f"{base}-slow"
    if name not in _METHODS:
        parent = get_method(base)

        def compress_target(self, weight, statistics, mask, dense=None):
            time.sleep(float(os.environ.get(SLEEP, "0")))
            return parent.compress_target(self, weight, statistics, mask, dense)

        register(type(f"{parent.__name__}Slow", (parent,), {"name": name, "compress_target": compress_target}))
    return name


def sibling_statistics(block: list) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of a LLaMA block's targets as far as they tell siblings apart: one Hessian tensor for the targets
    that read the same input (q/k/v of the attention, gate/up of the MLP), as the engine gathers them."""
    shared: dict[str, torch.Tensor] = {}
    inputs = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "gate_proj": "mlp", "up_proj": "mlp"}
    return {t.name: {"hessian": shared.setdefault(inputs.get(t.name.rsplit(".", 1)[-1], t.name), torch.empty(0))} for t in block}
