"""The SDK (mmengine/client.py) against `mmengine serve` as a real process,
over links that misbehave: a TCP proxy in the test's threads stands for the
network between them (one gone silent, a slow one either way, a server that
stops reading, a peer that closes)."""
from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from conftest import SLOW_HANDLER, Server, run, slow_loading, until, write_handler
from mmengine import protocol
from mmengine.client import AsyncClient, Client, parse_address
from mmengine.errors import Overloaded, Timeout

ZERO = {"seconds": np.zeros(1, np.float32)}  # the "slow" model, answering at once
# As many float32 ones as "n" asks for.
ONES_HANDLER = """
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    return {"y": np.ones(int(inputs["n"][0]), np.float32)}
"""
# How many values "x" holds.
COUNT_HANDLER = """
import numpy as np

def load(path, device):
    pass

def predict(inputs):
    return {"n": np.array([inputs["x"].size])}
"""


@pytest.fixture(scope="module")
def address(request, tmp_path_factory) -> tuple[str, int]:
    root = tmp_path_factory.mktemp("repo")
    write_handler(root, "slow", SLOW_HANDLER)
    write_handler(root, "ones", ONES_HANDLER)
    write_handler(root, "count", COUNT_HANDLER)
    write_handler(root, "slowload", slow_loading(3.0))
    server = Server("--repo", str(root), "--workers", "1", "--tcp-port", "0",
                    "--http-port", "-1")
    request.addfinalizer(lambda: server.proc.poll() is None and server.stop())
    m = server.wait_for(r"serving .* on tcp://(\S+):(\d+)", 60)
    return m.group(1), int(m.group(2))


class Proxy:
    """Forwards the connections made to `address` to `target`, each in a
    thread of its own. What goes back to the client moves `chunk` bytes at
    a time at `rate` bytes a second (None: as fast as it comes), what goes
    to the server at `request_rate`; `silence()` makes the connections
    open now silent for good, as a peer that vanished behind a NAT is
    (their bytes are read and dropped, nothing is closed); `stall()` makes
    them stop reading what their clients send, as a server that stopped
    reading does; connections made later are forwarded. A thread stops
    within `LIFE_S` whatever happens."""

    LIFE_S = 60.0

    def __init__(self, target: tuple[str, int], rate: float | None = None,
                 chunk: int = 65536, request_rate: float | None = None):
        self.target, self.rate, self.chunk = target, rate, chunk
        self.request_rate = request_rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = self.listener.getsockname()[:2]
        self.accepted = 0
        self.pairs: list[list] = []  # [client side, server side, silent, stalled]
        self.stopped = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stopped = True
        for thread in self.threads:
            thread.join(5)
        self.listener.close()

    def silence(self) -> None:
        for pair in self.pairs:
            pair[2] = True

    def stall(self) -> None:
        for pair in self.pairs:
            pair[3] = True

    def close_clients(self) -> None:
        """Closes the connections open now, toward their clients (a FIN),
        as a server closing them does."""
        for pair in self.pairs:
            with contextlib.suppress(OSError):
                pair[0].shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        end = time.monotonic() + self.LIFE_S
        while not self.stopped and time.monotonic() < end:
            try:
                a, _ = self.listener.accept()
            except socket.timeout:
                continue
            pair = [a, socket.create_connection(self.target), False, False]
            self.pairs.append(pair)
            self.accepted += 1
            thread = threading.Thread(target=self._pump, args=(pair,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, pair: list) -> None:
        a, b = pair[0], pair[1]
        end = time.monotonic() + self.LIFE_S
        try:
            while not self.stopped and time.monotonic() < end:
                readable, _, _ = select.select([b] if pair[3] else [a, b], [], [], 0.1)
                for s in readable:
                    data = s.recv(65536 if s is a else self.chunk)
                    if not data:
                        return
                    if pair[2]:
                        continue
                    (b if s is a else a).sendall(data)
                    if s is b and self.rate:
                        time.sleep(len(data) / self.rate)
                    elif s is a and self.request_rate:
                        time.sleep(len(data) / self.request_rate)
        except OSError:
            pass
        finally:
            a.close()
            b.close()


def test_an_async_connection_gone_silent_is_closed_and_the_next_call_connects_anew(address):
    # Bytes taken, nothing back, no FIN or RST (a dead upstream behind a
    # proxy): every later call on it timed out, for good.
    async def main():
        with Proxy(address) as proxy:
            async with AsyncClient(proxy.address, timeout=0.2) as c:
                await c.infer("slow", ZERO)
                proxy.silence()
                t0 = time.monotonic()
                first = asyncio.ensure_future(c.infer("slow", ZERO))  # waits 1.2 s
                await asyncio.sleep(0.05)
                beside = asyncio.ensure_future(c.infer("slow", ZERO, timeout=30))
                with pytest.raises(Timeout):
                    await first
                assert time.monotonic() - t0 < 5
                # Its connection is closed: a call in flight beside it fails
                # now, not at its own wait's end, 31 s on.
                with pytest.raises(ConnectionError, match="nothing came from the server"):
                    await asyncio.wait_for(beside, 5)
                assert (await c.infer("slow", ZERO))["y"].shape == (1,)
                assert proxy.accepted == 2
    run(main())


def test_async_calls_on_one_connection_time_out_each_at_its_own_wait(address):
    # One timer per connection, armed for the soonest wait: a call with a
    # short wait, made after one with a long wait, times out at its own.
    async def main():
        with Proxy(address) as proxy:
            async with AsyncClient(proxy.address, connections=1) as c:
                await c.health()
                proxy.silence()
                t0 = time.monotonic()
                long = asyncio.ensure_future(c.infer("slow", ZERO, timeout=2.0))  # waits 3 s
                await asyncio.sleep(0.05)
                short = asyncio.ensure_future(c.infer("slow", ZERO, timeout=0.1))  # 1.1 s
                took = {}
                for name, call in (("short", short), ("long", long)):
                    with pytest.raises(Timeout):
                        await call
                    took[name] = time.monotonic() - t0
                return took
    took = run(main())
    assert 1.05 <= took["short"] < 2.0, took  # (a due time is a millisecond early at most)
    assert 2.95 <= took["long"] < 4.5, took


def test_an_async_call_behind_one_that_still_waits_times_out_alone(address):
    # An unpin waits on the server behind a pin of its model that loads for
    # seconds, and hears nothing in its wait: the connection was taken for
    # silent and closed, and the pin beside it failed (a review).
    async def main():
        async with AsyncClient(address, timeout=1.0) as c:
            pin = asyncio.ensure_future(c.pin("slowload", timeout=30))
            await asyncio.sleep(0.2)
            with pytest.raises(Timeout):
                await c.unpin("slowload")
            row = await asyncio.wait_for(pin, 20)
            await c.unpin("slowload")
            return row
    assert run(main())["state"] == "resident"


def test_a_batch_whose_answers_keep_coming_is_waited_for_past_one_requests_wait(address):
    # Every answer comes within the wait of the one before it, over a link
    # that moves 2 KiB a second: the batch (~2.5 s) outlasts one request's
    # wait (1.5 s). The batch had that one wait, and raised Timeout with
    # every answer thrown away.
    requests = [("slow", {"seconds": np.zeros(1, np.float32) + i * 1e-9}) for i in range(80)]
    with Proxy(address, rate=2048, chunk=256) as proxy, Client(proxy.address, timeout=0.5) as c:
        t0 = time.monotonic()
        outs = c.infer_many(requests)
        assert time.monotonic() - t0 > 1.5  # past one request's wait: the link was slow
        assert [float(out["y"][0]) for out in outs] == [
            float(np.float32(i * 1e-9) * 2) for i in range(80)]
        proxy.silence()  # a batch whose answers stop is cut off a wait after the last
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            c.infer_many(requests)
        assert time.monotonic() - t0 < 5


def loaded(address, *models: str) -> None:
    """Loads `models` first: a test of the waits while bytes move must not
    wait for a cold model's load too (in the server's 0.1 s deadline, or
    while the model beside it answers first)."""
    with Client(address, timeout=30) as c:
        for model in models:
            c.load(model)


def test_an_async_call_waits_longer_while_a_large_answer_arrives(address):
    # 4 MiB over a link of 2 MiB/s: 2 s, past the call's wait (1.3 s), and
    # the call beside it waits behind it. Both timed out; Client read it.
    big = {"n": np.array([1 << 20])}
    loaded(address, "ones", "slow")

    async def main():
        with Proxy(address, rate=2 << 20) as proxy:
            async with AsyncClient(proxy.address, timeout=0.3) as c:
                t0 = time.monotonic()
                large = asyncio.ensure_future(c.infer("ones", big))
                await asyncio.sleep(0.05)
                small = await c.infer("slow", ZERO)
                assert time.monotonic() - t0 > 1.3
                assert (await large)["y"].shape == (1 << 20,)
                assert small["y"].shape == (1,)
                assert proxy.accepted == 1
    run(main())


def small_send_buffer(client: AsyncClient) -> None:
    """Bounds what the kernel takes of the client's requests before the
    server reads them (autotuned, it takes ~4 MiB on loopback): past that,
    a request's bytes move only as the server reads them."""
    for conn in client._conns:
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)


def test_an_async_call_waits_longer_while_a_large_request_is_sent(address):
    # 8 MiB over a link of 4 MiB/s toward the server: 2 s, past the call's
    # wait (1.3 s). It timed out with its request still going out, and
    # its connection was closed (nothing had come back); Client sent it.
    x = np.zeros(2 << 20, np.float32)
    loaded(address, "count")

    async def main():
        with Proxy(address, request_rate=4 << 20) as proxy:
            async with AsyncClient(proxy.address, timeout=0.3) as c:
                small_send_buffer(c)
                t0 = time.monotonic()
                out = await c.infer("count", {"x": x})
                assert time.monotonic() - t0 > 1.3  # past the wait: the link was slow
                assert out["n"][0] == x.size
                assert proxy.accepted == 1
    run(main())


def test_an_async_call_whose_request_stops_moving_times_out_on_time(address):
    # The server stops reading: what the kernel took of the request moved,
    # what the transport still holds did not, and the call's wait (1.1 s)
    # is put off by the first alone (8 MiB would have put it off 8 s).
    x = np.zeros(2 << 20, np.float32)

    async def main():
        with Proxy(address) as proxy:
            async with AsyncClient(proxy.address, timeout=0.1) as c:
                await c.health()  # the server's maximum frame, asked while it reads
                small_send_buffer(c)
                proxy.stall()
                t0 = time.monotonic()
                with pytest.raises(Timeout):
                    await c.infer("count", {"x": x})
                return time.monotonic() - t0
    took = run(main())
    assert 1.09 <= took < 2.1, took


@pytest.mark.parametrize("floats", [1 << 10, 2 << 20], ids=["small", "large"])
def test_a_blocking_call_whose_request_stops_moving_times_out_on_time(address, floats):
    # Its sends and reads wait in the kernel (SO_SNDTIMEO, SO_RCVTIMEO on a
    # blocking socket, not Python's timeout): a request the server stops
    # reading is bounded as an answer that does not come is. A small one
    # goes out whole and waits for its answer; of a large one, what moved
    # puts the wait off.
    x = np.zeros(floats, np.float32)
    with Proxy(address) as proxy, Client(proxy.address, timeout=0.1) as c:
        c.health()  # the server's maximum frame, asked while it reads
        c._pool[-1].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        proxy.stall()
        time.sleep(0.2)  # its pump's wait under way (0.1 s) still read the client
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            c.infer("count", {"x": x})
        took = time.monotonic() - t0
        assert not c._pool  # a connection that timed out is not used again
    assert 1.09 <= took < 2.5, took


def test_an_async_calls_wait_is_not_put_off_by_the_requests_of_calls_after_it(address):
    """A peer that reads and never answers (a proxy whose upstream went):
    requests of later calls on the same connection keep moving, and the
    call made before them still times out at its wait."""
    async def main():
        with Proxy(address) as proxy:
            async with AsyncClient(proxy.address, connections=1, timeout=0.3) as c:
                await c.health()
                proxy.silence()
                t0 = time.monotonic()
                first = asyncio.ensure_future(c.infer("count", {"x": np.ones(4, np.float32)}))
                later = []
                while not first.done() and time.monotonic() - t0 < 5:
                    # Under a MiB each: sent without asking the server's
                    # maximum frame first (CHECK_FRAMES_ABOVE).
                    later.append(asyncio.ensure_future(
                        c.infer("count", {"x": np.ones(225_000, np.float32)})))
                    await asyncio.sleep(0.1)  # ~9 MB/s of later requests
                with pytest.raises((Timeout, ConnectionError)):
                    await first
                took = time.monotonic() - t0
                await asyncio.gather(*later, return_exceptions=True)
                return took
    took = run(main())
    assert took < 2.5, took  # its wait is 1.3 s


@pytest.mark.parametrize("bad, error", [
    (["127.0.0.1", 1], TypeError), (b"h:1", TypeError), (None, TypeError), (8081, TypeError),
    (("h",), ValueError), (("h", 1, 2), ValueError), (("h", "80"), TypeError),
    (("h", True), TypeError), ((b"h", 80), TypeError), (("h", 70000), ValueError),
    (("h", -1), ValueError), (("", 80), ValueError), ((" h", 80), ValueError),
    (" h:6", ValueError), ("h\t:6", ValueError), ("h :6", ValueError)])
def test_an_address_of_another_type_or_form_is_refused_naming_the_forms(bad, error):
    # A list, None or an int raised AttributeError, bytes a TypeError of
    # str's; ("h",), ("h", "80"), ("h", 70000) and " h:6" were taken.
    with pytest.raises(error, match="host.*port"):
        parse_address(bad)
    with pytest.raises(error):
        Client(bad)
    with pytest.raises(error):
        AsyncClient(bad)


def test_an_address_tuple_is_read_as_a_str_and_an_int():
    assert parse_address(("::1", np.int64(8))) == ("::1", 8)
    assert type(parse_address(("h", np.int64(8)))[1]) is int
    assert parse_address(("h", 65535)) == ("h", 65535)


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError),
                                        (True, TypeError), ("4", TypeError)])
def test_a_pool_size_that_is_no_count_of_connections_is_refused(bad, error):
    with pytest.raises(error, match="pool_size"):
        Client("h:1", pool_size=bad)
    # AsyncClient's count of connections alike (True was taken as 1).
    with pytest.raises(error, match="connections"):
        AsyncClient("h:1", connections=bad + 1 if bad == -1 else bad)
    assert AsyncClient("h:1", connections=np.int64(2)).size == 2


def test_a_pool_size_of_0_keeps_no_idle_connection(address):
    # It kept every one, however many.
    with Proxy(address) as proxy, Client(proxy.address, pool_size=0) as c:
        for _ in range(3):
            assert c.infer("slow", ZERO)["y"].shape == (1,)
        assert not c._pool
        assert proxy.accepted == 3
    with Proxy(address) as proxy, Client(proxy.address, pool_size=1) as c:
        for _ in range(3):
            assert c.infer("slow", ZERO)["y"].shape == (1,)
        assert proxy.accepted == 1


def test_a_pooled_connection_closed_a_moment_after_its_last_call_is_replaced(address):
    # One used less than 0.1 s before was not asked about: the call went
    # on it and failed with a ConnectionError that said it may have run.
    with Proxy(address) as proxy, Client(proxy.address) as c:
        for _ in range(3):
            assert c.infer("slow", ZERO)["y"].shape == (1,)
            proxy.close_clients()
            assert select.select([c._pool[0].sock], [], [], 2)[0]  # its FIN is in
            assert c.infer("slow", ZERO)["y"].shape == (1,)
        assert proxy.accepted == 4


def test_an_async_connection_closed_while_its_loop_was_held_is_replaced(address):
    # The loop, held by its caller, had not read the server's close: the
    # next call went on the closed connection and failed.
    async def main():
        with Proxy(address) as proxy:
            async with AsyncClient(proxy.address) as c:
                for _ in range(3):
                    assert (await c.infer("slow", ZERO))["y"].shape == (1,)
                    proxy.close_clients()
                    conn = c._conns[0]
                    sock = conn.transport.get_extra_info("socket")
                    assert select.select([sock], [], [], 2)[0]  # its FIN is in, unread
                    assert conn.lost is None
                    assert (await c.infer("slow", ZERO))["y"].shape == (1,)
                assert proxy.accepted == 4
    run(main())


def test_a_late_answer_read_while_the_loop_was_held_keeps_its_connection(address):
    # A call's caller stopped waiting; its answer came while the caller held
    # the loop. Readable with nothing in flight was read as the server's
    # close, and the next call opened a new connection.
    async def main():
        with Proxy(address) as proxy:
            async with AsyncClient(proxy.address) as c:
                assert (await c.infer("slow", ZERO))["y"].shape == (1,)
                with pytest.raises(TimeoutError):  # cancelled: the server runs it
                    await asyncio.wait_for(
                        c.infer("slow", {"seconds": np.full(1, 0.3, np.float32)}), 0.05)
                sock = c._conns[0].transport.get_extra_info("socket")
                assert select.select([sock], [], [], 5)[0]  # the answer is in, unread
                assert (await c.infer("slow", ZERO))["y"].shape == (1,)
                assert c._conns[0].lost is None and not c._conns[0].dropped
                # Its end, after such an answer, is still read as one.
                proxy.close_clients()
                assert select.select([sock], [], [], 2)[0]
                assert (await c.infer("slow", ZERO))["y"].shape == (1,)
                # And so is an end right behind such an answer, both unread:
                # a look at the answer's first bytes took it for no end.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(
                        c.infer("slow", {"seconds": np.full(1, 0.3, np.float32)}), 0.05)
                sock = c._conns[0].transport.get_extra_info("socket")
                assert select.select([sock], [], [], 5)[0]  # the answer is in, unread
                proxy.close_clients()
                time.sleep(0.2)  # its end follows it
                assert (await c.infer("slow", ZERO))["y"].shape == (1,)
                return proxy.accepted
    assert run(main()) == 3


def test_an_error_about_the_connection_fails_its_calls_while_a_late_answer_is_owed(address):
    # An error frame of no id (the server's word on the whole connection)
    # was taken for the late answer of a call that had stopped waiting, and
    # dropped: the calls in flight waited out their timeouts.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def peer():
        conn, _ = listener.accept()
        with conn:
            frames = b""
            while frames.count(b"health") < 2:  # both requests, unanswered
                frames += conn.recv(1 << 16)
            conn.sendall(protocol.frame(protocol.error_response(None, Overloaded("full"))))
            conn.recv(1)  # until the client closes
    thread = threading.Thread(target=peer, daemon=True)
    thread.start()

    async def main():
        async with AsyncClient(listener.getsockname(), connections=1) as c:
            with pytest.raises(TimeoutError):  # cancelled: its answer is owed
                await asyncio.wait_for(c.health(), 0.2)
            with pytest.raises(Overloaded, match="full"):
                await c.health()  # (its wait: the client's 30 s)
    t0 = time.monotonic()
    try:
        run(main())
    finally:
        listener.close()
        thread.join(10)
    assert time.monotonic() - t0 < 20  # failed by the error, not after its wait


def test_a_small_answer_that_arrives_in_parts_is_read_whole(address):
    # The blocking client reads a small answer whole from its first read
    # (_Connection.exchange_one); one that read did not bring whole is read
    # on from there, on the same connection.
    with Proxy(address, rate=8000, chunk=5) as proxy, Client(proxy.address) as c:
        for i in range(3):
            seconds = np.full(1, i * 1e-6, np.float32)
            assert c.infer("slow", {"seconds": seconds})["y"].tolist() == (seconds * 2).tolist()
        assert c.call({"op": "health"})["ok"]
        assert proxy.accepted == 1  # each answer read to its end: the connection went on


class Bomber:
    """A peer that answers each request on each connection made to it (a
    thread per connection, 4 at most): `{"ok": true}`, or where the request
    asks for a "bomb", an answer of an array of more entries than the SDK
    decodes (protocol.MAX_ANSWER_ENTRIES), each a byte. `closed[i]` is set
    once connection i has ended (its client closed it)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = self.listener.getsockname()[:2]
        self.closed: list[threading.Event] = []
        self.answered: list[int] = []
        self.over = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def __enter__(self) -> "Bomber":
        return self

    def __exit__(self, *exc) -> None:
        self.over.set()
        for thread in self.threads:
            thread.join(10)
        self.listener.close()

    def _accept(self) -> None:
        while not self.over.is_set() and len(self.closed) < 4:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.closed.append(threading.Event())
            self.answered.append(0)
            thread = threading.Thread(target=self._serve, args=(conn, len(self.closed) - 1),
                                      daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, i: int) -> None:
        conn.settimeout(0.05)
        buf = b""
        with conn:
            while not self.over.is_set():
                try:
                    data = conn.recv(1 << 16)
                except socket.timeout:
                    continue
                except OSError:  # reset
                    break
                if not data:
                    break
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + protocol.LENGTH.unpack_from(buf)[0]:
                    n = protocol.LENGTH.unpack_from(buf)[0]
                    request, buf = protocol.decode(buf[4:4 + n]), buf[4 + n:]
                    self.answered[i] += 1  # (counted before its client can read it)
                    conn.sendall(self._answer(request))
        self.closed[i].set()

    @staticmethod
    def _answer(request: dict) -> bytes:
        if not request.get("bomb"):
            return protocol.frame({"id": request["id"], "ok": True})
        items = protocol.MAX_ANSWER_ENTRIES + 1  # zeros: one byte each
        body = (b"\x83" + msgpack.packb("id") + msgpack.packb(request["id"])
                + msgpack.packb("ok") + msgpack.packb(True) + msgpack.packb("pad")
                + b"\xdd" + items.to_bytes(4, "big") + bytes(items))
        return protocol.LENGTH.pack(len(body)) + body


TOO_MANY = f"more than {protocol.MAX_ANSWER_ENTRIES} entries"


def test_an_answer_of_too_many_entries_closes_its_connection_alone():
    # An answer was decoded whatever it held (the server limits only what
    # it reads): a peer that is no server of ours could make its client
    # build ~75 bytes of maps for each byte it sent.
    with Bomber() as peer, Client(peer.address, timeout=30) as c:
        assert c.call({"op": "health"})["ok"]
        with pytest.raises(ConnectionError, match=TOO_MANY):
            c.call({"op": "health", "bomb": True})
        assert peer.closed[0].wait(10)  # the client closed it
        assert c.call({"op": "health"})["ok"]  # on a connection of its own
        assert len(peer.closed) == 2 and not peer.closed[1].is_set()

    with Bomber() as peer:
        async def main():
            async with AsyncClient(peer.address, timeout=30, connections=2) as c:
                assert (await c.health())["ok"]  # on connection 0 (round-robin)
                with pytest.raises(ConnectionError, match=TOO_MANY):
                    await c.call({"op": "health", "bomb": True})  # on 1
                await until(peer.closed[1].is_set, what="the connection closed")
                assert (await c.health())["ok"]  # 0, still open
                assert (await c.health())["ok"]  # 1, opened again
                assert peer.answered[:2] == [2, 1] and not peer.closed[0].is_set()
                assert len(peer.closed) == 3 and peer.answered[2] == 1
        run(main(), timeout=60)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("raises", [True, False], ids=["raises", "returns"])
def test_a_signal_during_a_blocking_call_runs_its_handler(address, raises):
    # As Python's sockets do (PEP 475): a handler that raises ends the call
    # with its exception; one that returns lets the call go on to its answer.
    handled = []

    def handler(signum, frame):
        handled.append(signum)
        if raises:
            raise Interrupted()

    before = signal.signal(signal.SIGALRM, handler)
    try:
        with Client(address) as c:
            c.infer("slow", ZERO)  # connected, pooled: the call below waits in its read
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            if raises:
                with pytest.raises(Interrupted):
                    c.infer("slow", {"seconds": np.ones(1, np.float32)})
                assert time.monotonic() - t0 < 0.9  # not after its answer (1 s)
            else:
                out = c.infer("slow", {"seconds": np.full(1, 0.5, np.float32)})
                assert out["y"].tolist() == [1.0]
            assert handled == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
