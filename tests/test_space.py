"""Disk space (SPEC §3 purge): a steady write+purge load stays bounded on
disk, and purging hands space back without a blocking full VACUUM."""

import os
import random

from stagger_sqlite import StaggerQueue
from stagger_sqlite.schema import file_bytes

MB = 1_000_000

#: The bound README.rst states: with transactions of up to ~2 MB, file plus
#: WAL stay under this. Measured max: 6.5 MB (a 4 MB WAL limit plus the live
#: batch and the free pages kept for reuse); the rest is margin.
BOUND = 16 * MB


def test_60_mb_through_a_queue_with_a_purge_after_each_batch_stays_bounded(qpath):
    rnd = random.Random(7)
    peak = total = ack = 0
    with StaggerQueue(qpath, codec="raw") as q:
        while total < 60 * MB:
            batch = [os.urandom(rnd.randint(100, 20_000)) for _ in range(rnd.randint(1, 100))]
            total += sum(map(len, batch))
            q.write_many(batch)
            peak = max(peak, file_bytes(qpath))
            seen = 0
            for seq, msg in q.consume(ack=ack, purge=ack, wait=False, batch=50):
                ack = seq
                seen += 1
            assert seen == len(batch)
            peak = max(peak, file_bytes(qpath))
        q.purge(ack)
        peak = max(peak, file_bytes(qpath))
        assert len(q) == 0
        assert q.stats()["bytes"] == file_bytes(qpath)
    print(f"peak file+WAL {peak / MB:.1f} MB for {total / MB:.0f} MB through")
    assert peak < BOUND


def test_purge_gives_space_back(qpath):
    """After a burst is purged, the file shrinks (incremental vacuum plus the
    WAL size limit) instead of keeping its peak size forever."""
    with StaggerQueue(qpath, codec="raw") as q:
        for _ in range(20):
            q.write_many([os.urandom(10_000)] * 100)  # 20 MB burst
        peak = file_bytes(qpath)
        assert peak > 20 * MB
        q.purge()
        for _ in range(5):  # a little steady traffic lets checkpoints run
            q.write(b"x")
            q.purge()
        assert file_bytes(qpath) < 8 * MB
        assert q.last_seq == 2005
