import subprocess

import pytest
import torch

# The test models are tiny: one thread is as fast as two for them, and it avoids thread
# hand-offs that make tiny ops crawl when the machine is busy with other work.
torch.set_num_threads(1)


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs, where the machine lets the test mount one (root in a sandbox); else skipped."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
