import pytest

from hivemind.utils.performance_ema import PerformanceEMA


def test_performance_ema_first_update_is_exact():
    ema = PerformanceEMA(alpha=0.1)
    assert ema.update(task_size=100, interval=2.0) == pytest.approx(50.0)
    assert ema.num_updates == 1 and ema.ema_seconds_per_sample == pytest.approx(0.02)


def test_performance_ema_smooths_towards_new_speed():
    ema = PerformanceEMA(alpha=0.5)
    for _ in range(2):
        ema.update(10, interval=1.0)  # 10 samples/s
    speed = ema.update(10, interval=0.1)  # then 100 samples/s
    assert 10 < speed < 100


def test_performance_ema_pause_ignores_updates_and_resets_timer():
    ema = PerformanceEMA()
    ema.update(1, interval=1.0)
    with ema.pause():
        assert ema.update(1, interval=100.0) == pytest.approx(1.0)
    assert ema.num_updates == 1
    assert ema.update_threadsafe(1) > 1.0  # measured from the end of the pause, a few microseconds


def test_performance_ema_rejects_bad_input():
    with pytest.raises(ValueError):
        PerformanceEMA(alpha=0)
    with pytest.raises(ValueError):
        PerformanceEMA().update(0)
