"""Shared test setup: the tests use tiny tensors, so one intra-op thread is fastest (a second thread only spins;
on a shared 2-core CI machine OpenMP spin-waiting made some files 5-10x slower)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the flat modules at the repo root
torch.set_num_threads(1)
