"""NVFlare's simulator with its site mix-up forced: python tests/forced_race_simulator.py [--unfixed] <simulator args>.

Every client thread is held between writing its site's name into the shared build_ctx and sending it to the site's
worker, until all threads have written theirs (docs/nvflare_simulator_race.md). With the project's fix (the default)
each worker still gets its own name; with --unfixed, NVFlare as shipped sends every worker the last name written.
"""

from __future__ import annotations

import copy
import sys
import threading

from nvflare.private.fed.app.simulator import simulator_runner

from brats_fl import nvflare_compat


class HoldUntilAllNamed:
    """Stands in for the `copy` module inside simulator_runner: do_one_task deep-copies its deploy arguments between
    writing the name and sending it, so the first task of each thread waits there for every other thread's."""

    def __init__(self, n_threads: int):
        self.barrier = threading.Barrier(n_threads, timeout=60)
        self.held = 0
        self.lock = threading.Lock()

    def deepcopy(self, value, memo=None):
        if sys._getframe(1).f_code.co_name == "do_one_task":
            with self.lock:
                hold = self.held < self.barrier.parties
                self.held += 1
            if hold:
                self.barrier.wait()
        return copy.deepcopy(value, memo)


def main(argv: list[str]) -> int:
    unfixed = "--unfixed" in argv
    argv = [a for a in argv if a != "--unfixed"]
    threads = int(argv[argv.index("-t") + 1])
    simulator_runner.copy = HoldUntilAllNamed(threads)
    if unfixed:
        nvflare_compat.give_each_simulator_thread_its_own_build_ctx = lambda: None
    return nvflare_compat.run_simulator(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
