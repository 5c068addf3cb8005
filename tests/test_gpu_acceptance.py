"""bench/gpu_acceptance.sh on the CPU, with a stand-in nvidia-smi and a stand-in torch.

The stand-in torch is a package put first on the path of a stand-in venv's python; it answers
like a CUDA build of torch 2.13.0 that cannot use the GPU (driver too old), one without kernels
for the GPU's architecture (torch 1.11's CUDA 11.3 list on a Hopper card), or one that works.
That python refuses `-m pip`, so nothing is ever installed. No stage of the acceptance runs in
any of these tests: each stops at or before the GPU check.
"""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPT = os.path.join(ROOT, "bench", "gpu_acceptance.sh")
H100 = "0, NVIDIA H100 80GB HBM3, 9.0, 550.54.15"

sys.path.insert(0, os.path.join(ROOT, "bench"))
from common import can_run_on  # noqa: E402  (bench/ is not a package)


FAKE_TORCH = '''
import os
import warnings

mode = os.environ["FAKE_TORCH"]
__version__ = os.environ.get("FAKE_TORCH_VERSION", "2.13.0")


class version:
    cuda = "13.0"


class _C:
    @staticmethod
    def _cuda_getArchFlags():
        return "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"


class _Tensor:
    def __init__(self, value):
        self.value = value

    def __matmul__(self, other):
        return _Tensor(self.value * other.value * 64)

    def sum(self):
        return _Tensor(self.value * 64 * 64)

    def item(self):
        return self.value


def ones(*shape, device=None):
    if mode == "no-kernels":
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\\nmore")
    return _Tensor(1.0)


class cuda:
    @staticmethod
    def is_available():
        if mode == "old-driver":
            warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12040)")
            return False
        return True

    @staticmethod
    def device_count():
        return 0 if mode == "old-driver" else 1

    @staticmethod
    def get_device_capability(index):
        return (9, 0)

    @staticmethod
    def get_arch_list():
        if mode == "old-driver":
            return []
        if mode == "no-kernels":
            return ["sm_37", "sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86"]
        return ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
'''


@pytest.fixture
def machine(tmp_path):
    """Runs the script with a stand-in nvidia-smi (its output and exit status given) and venv."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    (tmp_path / "fake" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    pip_log = tmp_path / "pip.log"
    python = venv_bin / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$@" >> "{pip_log}"; exit 1; fi\n'
        f'PYTHONPATH="{tmp_path / "fake"}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (tmp_path / "bin").mkdir()

    def run(torch_mode, smi_output=H100, smi_status=0, *args, **env):
        smi = tmp_path / "bin" / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho {shlex.quote(smi_output)}\nexit {smi_status}\n")
        smi.chmod(0o755)
        environment = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                           GPU_ACCEPTANCE_VENV=str(tmp_path / "venv"), FAKE_TORCH=torch_mode, **env)
        result = subprocess.run(["bash", SCRIPT, *args], env=environment, capture_output=True, text=True,
                                timeout=120)
        result.pip_calls = pip_log.read_text().splitlines() if pip_log.exists() else []
        return result

    return run


def refusal(result) -> str:
    """The one line the script printed on stderr when refusing; no stage may have run."""
    assert result.returncode == 3, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "===" not in result.stdout, "a stage ran"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow  # runs the script in bash
def test_a_gpu_that_the_driver_keeps_from_torch_stops_the_run_with_the_driver_and_arch_list(machine):
    line = refusal(machine("old-driver", H100, 0, "--quick"))
    assert "NVIDIA H100 80GB HBM3" in line and "550.54.15" in line  # the GPU and its driver
    assert "torch.cuda.get_arch_list(): ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']" in line
    assert "is_available() is False (CUDA initialization: The NVIDIA driver on your system is too old" in line


@pytest.mark.slow  # runs the script in bash
def test_a_gpu_without_kernels_in_the_build_stops_the_run(machine):
    line = refusal(machine("no-kernels", H100, 0, "--quick"))
    assert "550.54.15" in line and "'sm_86']" in line
    assert "GPU 0 is sm_90, which this build has no kernels for" in line


@pytest.mark.slow  # runs the script in bash
def test_a_usable_gpu_passes_the_check(machine):
    result = machine("works", H100, 0, "--check")
    assert result.returncode == 0, result.stderr
    assert "GPU check passed: " + H100 in result.stdout and result.pip_calls == []


@pytest.mark.slow  # runs the script in bash
def test_without_a_listed_gpu_the_run_is_a_cpu_smoke_test_and_says_so(machine):
    result = machine("old-driver", "No devices were found", 6, "--check")
    assert result.returncode == 0, result.stderr
    assert "no GPU listed by nvidia-smi: a CPU smoke run" in result.stdout


@pytest.mark.slow  # runs the script in bash
def test_an_nvidia_smi_that_cannot_reach_the_driver_stops_the_run(machine):
    message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    line = refusal(machine("works", message, 9, "--quick"))
    assert "nvidia-smi fails" in line and message in line


@pytest.mark.slow  # runs the script in bash
def test_another_torch_is_replaced_by_the_pinned_one_never_used(machine):
    """A torch of another version in the venv (or the system's, which it sees): the pinned
    version is installed over it, and where that fails the run stops instead of using it."""
    result = machine("works", H100, 0, "--quick", FAKE_TORCH_VERSION="2.5.1")
    line = refusal(result)
    assert "could not install torch==2.13.0" in line
    assert len(result.pip_calls) == 1 and "--ignore-installed" in result.pip_calls[0]
    assert result.pip_calls[0].endswith("torch==2.13.0")


def test_which_builds_have_kernels_for_which_gpus():
    """Machine code runs within its major version on equal or later minors; PTX on any later GPU."""
    torch111_cu113 = ["sm_37", "sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86"]
    assert can_run_on((8, 0), torch111_cu113) and can_run_on((8, 9), torch111_cu113)  # A100; Ada via sm_86
    assert not can_run_on((9, 0), torch111_cu113)  # H100
    assert can_run_on((9, 0), ["sm_80", "compute_80"])  # PTX, compiled by the driver
    assert not can_run_on((7, 0), ["sm_75", "sm_80", "sm_90a", "compute_90"])  # V100 on a CUDA 13 list
    assert can_run_on((9, 0), ["sm_90a"]) and not can_run_on((10, 0), ["sm_90a"])
