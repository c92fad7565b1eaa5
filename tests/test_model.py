"""Property-based tests (hypothesis): the queue against a simple model.

Random sequences of write, write_many (including empty and unencodable
batches), consume from a random ack point, purge, reopen, and consumer
group rounds (ack / nack / moving on, then closing) are run against a real
queue file and against a dict. After every step: ``len`` and ``last_seq``
agree with the model; every consume returns exactly the model's messages
after the ack point; a group never hands out a message it finished ("nothing
acked comes back") or one that is not stored; purge never removes a message
the group has not finished, and removes exactly what the model says.

Bounded: ``scaled`` examples; ``tox -e torture`` runs many more.
"""

import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from stagger_sqlite import AckOutOfRangeError, EncodeError, StaggerQueue
from tests.faults import figure, scaled

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20) | st.binary(max_size=40)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)

STEPS = {"steps": 0, "examples": 0}


class QueueModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="stagger-model-")
        self.path = self.dir + "/q.db"
        self.q = StaggerQueue(self.path)
        self.stored = {}  # seq -> msg
        self.last = 0
        self.group = None  # set of finished seqs once the group exists
        STEPS["examples"] += 1

    def teardown(self):
        self.q.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _add(self, seqs, msgs):
        assert seqs == list(range(self.last + 1, self.last + 1 + len(msgs)))
        for s, m in zip(seqs, msgs):
            self.stored[s] = m
        if seqs:
            self.last = seqs[-1]

    @rule(msg=values)
    def write(self, msg):
        self._add([self.q.write(msg)], [msg])

    @rule(msgs=st.lists(values, max_size=6))
    def write_many(self, msgs):
        self._add(self.q.write_many(msgs), msgs)

    @rule(msgs=st.lists(values, max_size=3))
    def write_many_unencodable(self, msgs):
        with pytest.raises(EncodeError):
            self.q.write_many(msgs + [object()])

    @rule(data=st.data(), batch=st.integers(1, 5))
    def consume(self, data, batch):
        ack = data.draw(st.integers(0, self.last + 2))
        if ack > self.last:
            with pytest.raises(AckOutOfRangeError):
                self.q.consume(ack, wait=False)
            return
        got = list(self.q.consume(ack, batch=batch, wait=False))
        assert got == [(s, m) for s, m in sorted(self.stored.items()) if s > ack]

    def _floor(self):
        """Highest k such that the group finished every message <= k."""
        if self.group is None:
            return self.last
        unfinished = [s for s in self.stored if s not in self.group]
        return min(unfinished) - 1 if unfinished else self.last

    @rule(data=st.data())
    def purge(self, data):
        upto = data.draw(st.none() | st.integers(0, self.last + 1))
        bound = min(self.last if upto is None else upto, self._floor())
        gone = [s for s in self.stored if s <= bound]
        assert self.q.purge(upto) == len(gone)
        for s in gone:
            del self.stored[s]

    @rule()
    def reopen(self):
        self.q.close()
        self.q = StaggerQueue(self.path)

    @rule(batch=st.integers(1, 4), actions=st.lists(st.sampled_from(["ack", "nack", "next"]), min_size=1, max_size=6))
    def group_round(self, batch, actions):
        if self.group is None:
            self.group = set()
        with self.q.consume(group="g", batch=batch, wait=False, max_attempts=10_000) as c:
            for action in actions:
                try:
                    seq, msg = next(c)
                except StopIteration:
                    break
                assert seq not in self.group, f"seq {seq} was finished and came back"
                assert self.stored.get(seq, msg) == msg and seq in self.stored
                if action == "ack":
                    assert c.ack(seq) is True
                    self.group.add(seq)
                elif action == "nack":
                    assert c.nack(seq, delay=0) is True
                else:
                    self.group.add(seq)  # finished by the next next() or the close

    @precondition(lambda self: self.group is not None)
    @rule()
    def group_drain(self):
        with self.q.consume(group="g", wait=False, max_attempts=10_000) as c:
            for seq, msg in c:
                assert seq not in self.group, f"seq {seq} was finished and came back"
                assert self.stored[seq] == msg
                self.group.add(seq)
        info = self.q.groups()["g"]
        assert info.acked == self.last and info.in_flight == 0 and info.retrying == 0, info
        assert all(s in self.group for s in self.stored)

    @invariant()
    def figures_agree(self):
        STEPS["steps"] += 1
        assert self.q.last_seq == self.last
        assert len(self.q) == len(self.stored)


QueueModel.TestCase.settings = settings(
    max_examples=scaled(100, 2000),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestQueueModel = QueueModel.TestCase


def test_zz_model_figures():
    """Runs after the machine (file order): reports how much it tried."""
    figure("model (hypothesis)", examples=STEPS["examples"], steps=STEPS["steps"])
