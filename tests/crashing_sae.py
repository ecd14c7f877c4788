"""A TopK SAE that crashes one rank of a distributed run on purpose, for the DDP failure tests.

It crashes in the process whose LOCAL_RANK is $MIDISC_TEST_CRASH_RANK, at its $MIDISC_TEST_CRASH_STEP-th training
forward; with $MIDISC_TEST_HANG_S it stops answering instead, for that many seconds, then dies without a word
(as a rank killed by the machine would). With neither variable set it is a plain TopKSAE, so a resumed run of it
trains to the end.
"""

import os
import time

from midisc.sae.topk import TopKSAE


class CrashingTopKSAE(TopKSAE):
    architecture = TopKSAE.architecture

    forwards = 0  # training forwards of this process (the constructor stays TopKSAE's: the config checks it)

    def forward(self, x, **kwargs):
        if self.training:
            self.forwards += 1
        rank, step = os.environ.get("MIDISC_TEST_CRASH_RANK"), os.environ.get("MIDISC_TEST_CRASH_STEP")
        if rank is not None and os.environ.get("LOCAL_RANK") == rank and self.forwards == int(step or 1):
            if os.environ.get("MIDISC_TEST_HANG_S"):
                time.sleep(float(os.environ["MIDISC_TEST_HANG_S"]))
                os._exit(1)
            raise RuntimeError(f"planted crash on rank {rank} at step {self.forwards}")
        return super().forward(x, **kwargs)
