"""`rtk deploy vllm`: the exact vLLM command, compose file or Kubernetes manifest for a model folder.

Everything is built on rtk.serve.flags.vllm_args, so the command a test runs on CPU and the arguments in
the containers differ only by the device target (rtk.serve.flags.TARGETS), the host and the model path.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from rtk import DISTRIBUTION, __version__
from rtk.errors import RtkError
from rtk.export.layouts import PER_LAYER, layout_of
from rtk.model.load import read_config
from rtk.model.arch import DECILM_ARCH, FAMILIES, NATIVE
from rtk.model.sublayer import RemovedSet, removed_set
from rtk.serve.flags import TARGETS, check_online_quantization, needs_remote_code, plugin_args, vllm_args
from rtk.settings import VLLM_CUDA_RELEASE

VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_CUDA_RELEASE}"  # the GPU install's vLLM release (rtk.settings)
# folders that need rtk's vLLM plugin: vLLM's image with rtk installed next to vLLM
PLUGIN_IMAGE = f"rtk-vllm-openai:{VLLM_IMAGE.split(':')[1]}-rtk{__version__}"
PLUGIN_DOCKERFILE = f"FROM {VLLM_IMAGE}\nRUN pip install --no-cache-dir {DISTRIBUTION}=={__version__}\n"
API_MODULE = "vllm.entrypoints.openai.api_server"
CONTAINER_MODEL = "/model"
FORMATS = ("command", "compose", "k8s", "ray")
RAY_PORT = 6379
STARTUP_S = 600  # time a container gets to load the model before its health check counts


@dataclass(frozen=True)
class ModelInfo:
    """What serving needs to know about a model folder, read from its config.json."""

    path: str  # as the user gave it
    layers: int
    heads: int
    kv_heads: dict  # KV-head count -> the layers whose attention has that many
    max_positions: Optional[int]
    remote_code: bool
    size_bytes: int
    plugin: Optional[list] = None  # None: stock vLLM serves it; else rtk's plugin does, with these extra args


def _positive_int(cfg: dict, key: str, where: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise RtkError(f"{where}/config.json: '{key}' is missing or not a positive integer (got {v!r})")
    return v


def inspect_model(model_dir: str | Path) -> ModelInfo:
    """Read a model folder; a folder vLLM could not serve is an RtkError naming the file and field."""
    where = f"model: {model_dir}"
    p = Path(model_dir)
    if not p.is_dir():
        raise RtkError(f"{where}: no such folder")
    if not (p / "config.json").is_file():
        raise RtkError(f"{where}: folder has no config.json, so it is not a model folder")
    cfg = read_config(p)  # one clear line for a config.json that is not a JSON object
    if not any(p.glob("*.safetensors")):
        raise RtkError(f"{where}: folder has no *.safetensors weights")
    layers = _positive_int(cfg, "num_hidden_layers", where)
    heads = _positive_int(cfg, "num_attention_heads", where)
    if cfg.get("model_type") == NATIVE:
        if cfg.get("architectures") != [DECILM_ARCH]:
            raise RtkError(f"{where}/config.json: 'architectures' is {cfg.get('architectures')!r}; vLLM serves "
                           f"{NATIVE} folders only as [\"{DECILM_ARCH}\"]")
        removed = removed_set({"block_configs": None, **cfg}, f"{where}/config.json")  # its blocks must be there
        _check_first_sublayer(removed, layers, where)
        kv = _kv_heads(cfg["block_configs"], removed.attention_layers(layers), heads, where)
    else:
        removed = removed_set(cfg, f"{where}/config.json")  # per_layer_config skips, if any
        kv = {cfg.get("num_key_value_heads") or heads: _attention_layers(cfg, removed, layers, where)}
    max_pos = cfg.get("max_position_embeddings")
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return ModelInfo(str(model_dir), layers, heads, kv, max_pos if isinstance(max_pos, int) else None,
                     needs_remote_code(p), size, plugin_args(p))


def _kv_heads(blocks: list, attention: list[int], heads: int, where: str) -> dict[int, list[int]]:
    """KV-head count -> the layers of a nemotron-nas config whose attention has that many."""
    kv: dict[int, list[int]] = {}
    for i in attention:
        group = blocks[i]["attention"].get("n_heads_in_group")
        if not isinstance(group, int) or group < 1 or heads % group:
            raise RtkError(f"{where}/config.json: block_configs[{i}].attention.n_heads_in_group={group!r} "
                           f"does not divide num_attention_heads={heads}")
        kv.setdefault(heads // group, []).append(i)
    return kv


def _attention_layers(cfg: dict, removed: RemovedSet, layers: int, where: str) -> list[int]:
    """The layers of a standard config that keep their attention. A config with per_layer_config skips
    (or architectures [RtkForCausalLM]) is served by rtk's vLLM plugin, which reads the base architectures
    in its table only; anything else no vLLM path serves."""
    if layout_of(cfg) not in PER_LAYER:
        return list(range(layers))
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise RtkError(f"{where}/config.json: model_type {mt!r} with {cfg.get('architectures')} and per-layer skips: "
                       f"neither stock vLLM nor rtk's vLLM plugin serves it (the plugin serves "
                       f"{', '.join(FAMILIES)}; stock vLLM serves rtk's {NATIVE} folders)")
    keep = removed.attention_layers(layers)
    if not keep:
        raise RtkError(f"{where}/config.json: no layer has attention; vLLM cannot serve this model")
    return keep


def _check_first_sublayer(removed: RemovedSet, layers: int, where: str) -> None:
    """Stock vLLM's DeciLM starts the residual stream in the first attention: an MLP before any
    attention (or no sublayer at all) crashes it. rtk protects attn.0 by default for this reason."""
    blocker = removed.first_blocker(layers)
    if blocker is not None:
        i = blocker.layer
        raise RtkError(f"{where}/config.json: layer {i} keeps its MLP but no attention comes before it "
                       f"(block_configs[{i}].attention.no_op); stock vLLM's {NATIVE} model cannot "
                       f"serve that: re-export the folder (rtk export {where.split(': ', 1)[1]} -o NEW) for "
                       f"rtk's vLLM plugin, or prune with protect: [attn.0]")
    if not removed.attention_layers(layers):
        raise RtkError(f"{where}/config.json: no layer has attention; stock vLLM cannot serve this model")


def tp_ok(info: ModelInfo, tp: int) -> bool:
    """vLLM's rule: TP divides the attention heads, and the KV heads of every layer (or, with fewer
    KV heads than GPUs, is a multiple of them: vLLM then replicates the KV heads)."""
    return info.heads % tp == 0 and all(k % tp == 0 if k >= tp else tp % k == 0 for k in info.kv_heads)


def check_parallel(info: ModelInfo, tp: int, pp: int) -> None:
    if not tp_ok(info, tp):
        if len(info.kv_heads) == 1:
            kv = f"the {next(iter(info.kv_heads))} KV heads"
        else:
            kv = "the KV heads " + ", ".join(f"{k} (layers {_ranges(ls)})" for k, ls in sorted(info.kv_heads.items()))
        valid = ", ".join(str(t) for t in range(1, info.heads + 1) if tp_ok(info, t))
        raise RtkError(f"--tensor-parallel {tp}: must divide the {info.heads} attention heads and {kv} "
                       f"of {info.path}/config.json; valid sizes: {valid}")
    if pp > info.layers:
        raise RtkError(f"--pipeline-parallel {pp}: more stages than the {info.layers} layers of "
                       f"{info.path}/config.json")


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, n in enumerate(layers):
        start = n if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def served_name_for(model_dir: str | Path) -> str:
    """OUT/model -> 'OUT'; any other folder -> its own name."""
    p = Path(os.path.abspath(model_dir))
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def k8s_name(name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].strip("-")
    return slug or "rtk-model"


@dataclass(frozen=True)
class Deployment:
    """One resolved set of serving settings; render() turns it into the requested format."""

    info: ModelInfo
    device: str
    port: int
    host: str
    tp: int
    pp: int
    dtype: str
    max_model_len: int
    served_name: str
    invocation: str  # the rtk command that produced it (written into file headers)
    env: dict = field(default_factory=dict)
    quantization: Optional[str] = None  # vLLM's online quantization (rtk.serve.flags.ONLINE_QUANTIZATION)

    def args(self, model_path: str, host: str, backend: Optional[str] = None) -> list[str]:
        return vllm_args(model_path, port=self.port, host=host, dtype=self.dtype,
                         max_model_len=self.max_model_len, served_name=self.served_name, tensor_parallel=self.tp,
                         pipeline_parallel=self.pp, enforce_eager=TARGETS[self.device].enforce_eager,
                         trust_remote_code=self.info.remote_code, executor_backend=backend,
                         plugin=self.info.plugin or [], quantization=self.quantization)

    @property
    def image(self) -> str:
        """vLLM's image, or (rtk's plugin needed) that image with rtk installed (PLUGIN_DOCKERFILE)."""
        return VLLM_IMAGE if self.info.plugin is None else PLUGIN_IMAGE

    def image_spec(self) -> dict:
        """compose: the image, built from PLUGIN_DOCKERFILE where rtk's plugin is needed."""
        if self.info.plugin is None:
            return {"image": VLLM_IMAGE}
        return {"image": PLUGIN_IMAGE, "build": {"context": ".", "dockerfile_inline": PLUGIN_DOCKERFILE}}

    def argv(self, python: str = "python") -> list[str]:
        """The local command line (for --format command and --run)."""
        return [python, "-m", API_MODULE, *self.args(self.info.path, self.host)]

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def plan(model_dir: str, *, device: str, fmt: str = "command", port: int = 8000, host: str = "127.0.0.1",
         tp: int = 1, pp: int = 1, dtype: Optional[str] = None, max_model_len: Optional[int] = None,
         served_name: Optional[str] = None, invocation: str = "", quantization: Optional[str] = None) -> Deployment:
    """Validate everything before anything is written or started."""
    if fmt in ("compose", "k8s", "ray") and device != "cuda":
        raise RtkError(f"--device {device}: --format {fmt} uses the CUDA image {VLLM_IMAGE}; "
                       f"for a CPU server use --format command or --run")
    if fmt == "ray" and pp < 2:
        raise RtkError("--format ray: puts one pipeline stage on each node, so it needs --pipeline-parallel 2 or "
                       "more (for one machine use --format compose)")
    info = inspect_model(model_dir)
    check_parallel(info, tp, pp)
    check_online_quantization(model_dir, quantization, device)
    target = TARGETS[device]
    if max_model_len is None:
        max_model_len = target.max_model_len or info.max_positions
        if max_model_len is None:
            raise RtkError(f"model: {model_dir}/config.json has no max_position_embeddings; pass --max-model-len")
    elif info.max_positions is not None and max_model_len > info.max_positions:
        raise RtkError(f"--max-model-len {max_model_len}: longer than max_position_embeddings="
                       f"{info.max_positions} in {model_dir}/config.json")
    return Deployment(info, device, port, host, tp, pp, dtype or target.dtype, max_model_len,
                      served_name or served_name_for(model_dir), invocation, dict(target.env), quantization)


def run_local(d: Deployment, echo, python: str, log_path: Optional[Path] = None,
              startup_timeout: float = 600.0) -> None:
    """Start vLLM here, wait for /health, print the URL, and serve until Ctrl-C (or SIGTERM), then
    stop it (the server runs in its own process group, so a terminal's Ctrl-C reaches only rtk)."""
    import signal

    from rtk.serve.flags import preflight
    from rtk.serve.server import VLLMServer, port_in_use

    preflight(d.info.path, d.env)
    if port_in_use(d.port):
        raise RtkError(f"--port {d.port}: already in use on 127.0.0.1")
    server = VLLMServer(d.info.path, port=d.port, command=d.argv(python), env=d.env, log_path=log_path,
                        startup_timeout=startup_timeout)

    def _term(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too: a process started with SIGINT ignored (a job started in the background by a non-interactive
    # shell, as CI runners do) would otherwise never see Ctrl-C's KeyboardInterrupt
    previous = {sig: signal.signal(sig, _term) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        echo(f"rtk: starting vLLM: {shlex.join(d.argv(python))} (log: {server.log_path})")
        with server:
            echo(f"rtk: serving '{d.served_name}' at {server.url}/v1 (Ctrl-C stops it)")
            code = server.proc.wait()
            raise RtkError(f"vLLM exited with code {code}; last log line: {server.tail(1)!r} "
                           f"(log: {server.log_path})")
    except KeyboardInterrupt:
        echo("rtk: vLLM stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
