"""The ONNX converter overrides are installed only inside ``overrides()`` and are restored exactly, also when two
threads import at once (the frontend's table is module state)."""
import threading
import time

from targets import onnx_converters
from tvm.relax.frontend.onnx import onnx_frontend as frontend


def test_overrides_in_place_inside_and_restored_after():
    original = frontend._get_convert_map
    with onnx_converters.overrides():
        table = frontend._get_convert_map()
        assert table["Reshape"] is onnx_converters.ScalarReshape
        assert table["Range"] is onnx_converters.SymbolicRange
    assert frontend._get_convert_map is original
    assert frontend._get_convert_map()["Reshape"] is not onnx_converters.ScalarReshape


def test_concurrent_imports_leave_the_original_table():
    """A enters first and leaves first; B enters while A is inside and leaves last. Without serialization B would
    save A's patched table as "the original" and put it back at the end."""
    original = frontend._get_convert_map
    a_inside = threading.Event()
    seen_inside = []

    def first():
        with onnx_converters.overrides():
            a_inside.set()
            time.sleep(0.1)
            seen_inside.append(frontend._get_convert_map()["Reshape"])

    def second():
        a_inside.wait()
        with onnx_converters.overrides():
            time.sleep(0.2)
            seen_inside.append(frontend._get_convert_map()["Reshape"])

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen_inside == [onnx_converters.ScalarReshape] * 2
    assert frontend._get_convert_map is original
