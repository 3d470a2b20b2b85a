"""AsyncEngine lifetime without its thread: tools (benchmarks) drive engine steps themselves."""
from engine.async_engine import AsyncEngine
from tests.helpers import make_tiny_model, tiny_engine


def test_shutdown_without_start_returns(tmp_path):
    make_tiny_model("llama-untied-gqa1", tmp_path)
    engine = AsyncEngine(tiny_engine(tmp_path))
    engine.shutdown()            # used to raise: join() on a thread that never started
    engine.shutdown()            # and again, idempotent
