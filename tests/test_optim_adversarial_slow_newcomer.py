"""Epochs that start early can be shorter than a peer's step. A newcomer with such slow steps downloads the state of
epoch E while the others are already in E+1, and reports E: the others must still expect it at the end of E+1 (it
reported E after they had left it, so it is alive and catching up), or, whenever their view of it is a moment
stale, they end every epoch without it and it downloads the state at each of its steps without ever averaging
(measured with 3 fast peers and a newcomer stepping every 0.25 s: 16+ epochs without a round in 3 of 4 runs)."""

import pytest
from optim_swarm_helpers import dht_pair, started_trackers, wait_for

__all__ = ["dht_pair"]  # the fixture, used by the tests below


@pytest.mark.timeout(30)
def test_a_newcomer_that_reports_the_previous_epoch_after_the_others_left_it_is_expected(dht_pair):
    with started_trackers(dht_pair, target_batch_size=100) as (veteran, newcomer):
        with veteran.pause_updates():
            veteran.update_epoch(new_epoch=5)  # the veteran just averaged alone and entered epoch 5
        with newcomer.pause_updates():
            newcomer.update_epoch(new_epoch=4)  # then the newcomer reports the epoch it downloaded: 4
        wait_for(lambda: any(record.epoch == 4 for record in veteran.records()), timeout=10.0)
        last_round = {dht_pair[0].peer_id.to_bytes()}  # the newcomer was not in the veteran's last round
        assert veteran.count_expected_peers(5, last_round) == 2


@pytest.mark.timeout(30)
def test_a_peer_that_stopped_in_the_previous_epoch_before_the_others_left_it_is_not_expected(dht_pair):
    with started_trackers(dht_pair, target_batch_size=100) as (veteran, stopped):
        with stopped.pause_updates():
            stopped.update_epoch(new_epoch=4)
        wait_for(lambda: any(record.epoch == 4 for record in veteran.records()), timeout=10.0)
        with veteran.pause_updates():
            veteran.update_epoch(new_epoch=5)  # left epoch 4 after the other peer's last report
        last_round = {dht_pair[0].peer_id.to_bytes()}
        wait_for(lambda: veteran.fetched_global_progress_this_epoch.is_set(), timeout=10.0)
        assert veteran.count_expected_peers(5, last_round) == 1
