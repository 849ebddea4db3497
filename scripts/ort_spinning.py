"""What ONNX Runtime's thread-pool spinning costs and buys on this machine (docs/BENCHMARKS.md).

    OMP_NUM_THREADS=1 python scripts/ort_spinning.py MODEL.onnx

Two sessions of the same fp32 graph (2 intra-op threads), spinning on and off: their latency over
300 interleaved back-to-back calls, then the rate of a numpy job in a second thread while the
session is called with 5 ms gaps (a service), twice.
"""

import statistics
import sys
import threading
import time

import numpy as np
import onnxruntime as ort

onnx = sys.argv[1]


def session(spin):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.log_severity_level = 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(onnx, o, providers=["CPUExecutionProvider"])


s = {True: session(True), False: session(False)}
inp = s[True].get_inputs()
feeds = {}
for i in inp:
    shape = [d if isinstance(d, int) else (1 if k == 0 else 64) for k, d in enumerate(i.shape)]
    feeds[i.name] = (
        np.random.rand(*shape).astype(np.float32) if "float" in i.type else np.full(shape, 64, np.float32)
    )
print({k: v.shape for k, v in feeds.items()})
for sp in s:
    [s[sp].run(None, feeds) for _ in range(10)]
t = {True: [], False: []}
for r in range(300):
    for sp in (True, False) if r % 2 else (False, True):
        a = time.perf_counter()
        s[sp].run(None, feeds)
        t[sp].append((time.perf_counter() - a) * 1e3)
print(
    f"alone: spin on p50 {statistics.median(t[True]):.2f} ms, off p50 {statistics.median(t[False]):.2f} ms, ratio off/on {statistics.median(t[False]) / statistics.median(t[True]):.2f}"
)


# another compute job in the process (numpy matmul in a thread, releases the GIL) while ORT idles between calls
def neighbour_rate(spin, seconds=3.0):
    stop = time.perf_counter() + seconds
    done = [0]
    m = np.random.rand(256, 256).astype(np.float32)

    def work():
        while time.perf_counter() < stop:
            m @ m
            done[0] += 1

    th = threading.Thread(target=work)
    th.start()
    while time.perf_counter() < stop:
        s[spin].run(None, feeds)
        time.sleep(0.005)  # a service: calls with gaps
    th.join()
    return done[0] / seconds


for _rep in range(2):
    on, off = neighbour_rate(True), neighbour_rate(False)
    print(
        f"neighbour matmuls/s beside ORT with gaps: spin on {on:.0f}, off {off:.0f} (off/on {off / on:.2f})"
    )
