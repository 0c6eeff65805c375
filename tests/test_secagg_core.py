"""Secure aggregation's building blocks: the fixed-point encoding (its error bound and overflow refusal), the
library primitives as the protocol uses them, the shuffled ring, and the parameter checks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flora.edge.secagg import primitives as p
from flora.edge.secagg.encoding import Encoding, EncodingError, decode_sum, encode
from flora.edge.secagg.params import ParamsError, SecAggParams
from flora.edge.secagg.ring import default_shares, default_threshold, neighbourhoods, ring_order

CTX = p.Context("fed", "run1", 3, 0)


def test_the_decoded_sum_is_the_weighted_sum_within_the_bound():
    enc = Encoding(clip=0.5, frac_bits=12, max_weight=1000)
    rng = np.random.default_rng(1)
    deltas = [rng.uniform(-0.5, 0.5, 4000) for _ in range(5)]
    weights = [1, 7, 999, 42, 3]
    total = sum(encode(d, w, enc, 64).values for d, w in zip(deltas, weights))
    num, wsum = decode_sum(total, enc)
    assert wsum == sum(weights)
    exact = sum(w * d for d, w in zip(deltas, weights)) / wsum
    err = np.max(np.abs(num / wsum - exact))
    assert err <= enc.error_bound(5, wsum)
    assert err > 0  # quantized: not the float sum by accident


def test_stochastic_rounding_is_unbiased():
    enc = Encoding(clip=1.0, frac_bits=0, max_weight=1)  # units of 1: 0.3 rounds to 0 or 1
    values = np.full(200_000, 0.3)
    out = encode(values, 1, enc, 32, rng=np.random.default_rng(0)).values[:-1].view(np.int32)
    assert set(np.unique(out)) == {0, 1}
    assert abs(out.mean() - 0.3) < 0.005


def test_negative_values_wrap_into_the_ring_and_back():
    enc = Encoding(clip=2.0, frac_bits=8, max_weight=1)
    e = encode(np.array([-1.5, 1.25, -2.5]), 1, enc, 32, rng=np.random.default_rng(0))
    num, w = decode_sum(e.values, enc)
    assert list(num) == [-1.5, 1.25, -2.0] and w == 1  # exact multiples of the unit; -2.5 clipped to -2
    assert e.clipped == 1


def test_a_configuration_that_could_overflow_is_refused():
    enc = Encoding(clip=1.0, frac_bits=24, max_weight=1 << 20)
    assert enc.required_bits(1) > 32
    with pytest.raises(EncodingError, match="more than 64"):
        enc.width(1 << 20)
    with pytest.raises(EncodingError, match="could overflow"):
        enc.check(1000, 32)
    with pytest.raises(ParamsError, match="overflow"):
        SecAggParams(4, 3, 1000, 32, enc)
    with pytest.raises(EncodingError, match="2\\^52"):
        Encoding(clip=1.0, frac_bits=40, max_weight=1 << 20)


def test_the_ring_is_just_wide_enough_and_holds_the_worst_case():
    enc = Encoding(clip=1.0, frac_bits=8, max_weight=16)
    bits = enc.width(100)
    assert bits == 32
    worst = np.full(10, 1.0)
    total = sum(encode(worst, 16, enc, bits).values for _ in range(100))
    num, w = decode_sum(total, enc)
    assert np.all(num == 100 * 16 * 1.0) and w == 1600  # the largest sum decodes without wrapping
    assert Encoding(clip=1.0, frac_bits=8, max_weight=16).width(10 ** 7) == 64


def test_encode_refuses_what_it_cannot_encode():
    enc = Encoding(max_weight=10)
    with pytest.raises(EncodingError, match="max_weight"):
        encode(np.zeros(3), 11, enc, 64)
    with pytest.raises(EncodingError, match="positive"):
        encode(np.zeros(3), 0, enc, 64)
    with pytest.raises(EncodingError, match="not finite"):
        encode(np.array([0.0, np.nan]), 1, enc, 64)
    with pytest.raises(EncodingError, match="noise"):
        encode(np.zeros(3), 1, enc, 64, noise=np.ones(3, np.int64))  # noise_bound 0: no noise allowed


def test_noise_shares_ride_below_the_mask_within_their_bound():
    enc = Encoding(clip=1.0, frac_bits=4, max_weight=1, noise_bound=3)
    noise = np.array([3, -3, 0], np.int64)
    e = encode(np.zeros(3), 1, enc, 32, noise=noise)
    assert list(e.values[:-1].view(np.int32)) == [3, -3, 0]
    with pytest.raises(EncodingError, match="noise_bound"):
        encode(np.zeros(3), 1, enc, 32, noise=np.array([4, 0, 0]))


def test_shamir_shares_a_32_byte_secret_t_of_k():
    secret = os.urandom(32)
    shares = p.split_secret(secret, 3, 5)
    assert [i for i, _ in shares] == [1, 2, 3, 4, 5] and all(len(s) == 32 for _, s in shares)
    assert p.combine_secret([shares[4], shares[0], shares[2]]) == secret
    assert p.combine_secret([*shares[:2], shares[3]]) == secret
    assert p.combine_secret(shares[:2]) != secret  # t - 1 shares give nothing useful


def test_masks_are_a_chacha20_keystream_of_the_whole_key():
    key = os.urandom(32)
    a = p.mask(key, 1000, np.uint64)
    assert a.dtype == np.dtype("<u8") and len(a) == 1000
    assert np.array_equal(a[:10], p.mask(key, 10, np.uint64))  # a prefix of the same stream
    flipped = key[:31] + bytes([key[31] ^ 1])
    assert not np.array_equal(a, p.mask(flipped, 1000, np.uint64))  # the last byte matters too
    with pytest.raises(p.CryptoError):
        p.mask(key[:16], 10, np.uint64)


def test_keys_are_bound_to_their_context_and_direction():
    a, a_pub = p.new_x25519()
    b, b_pub = p.new_x25519()
    assert p.agree(a, b_pub, CTX.info("x", "y", "share")) == p.agree(b, a_pub, CTX.info("x", "y", "share"))
    assert p.agree(a, b_pub, CTX.info("x", "y", "share")) != p.agree(a, b_pub, CTX.info("y", "x", "share"))
    other = p.Context("fed", "run1", 3, 1)
    assert p.agree(a, b_pub, CTX.info("x", "y", "share")) != p.agree(a, b_pub, other.info("x", "y", "share"))
    with pytest.raises(p.CryptoError):
        p.agree(a, bytes(32), CTX.info("x", "y", "share"))  # a low-order point


def test_sealed_shares_authenticate_their_context():
    key = os.urandom(32)
    nonce, ct = p.seal(key, b"s" * 64, b"ctx-a")
    assert p.open_sealed(key, nonce, ct, b"ctx-a") == b"s" * 64
    with pytest.raises(p.CryptoError):
        p.open_sealed(key, nonce, ct, b"ctx-b")
    with pytest.raises(p.CryptoError):
        p.open_sealed(key, nonce, ct[:-1] + bytes([ct[-1] ^ 1]), b"ctx-a")


def test_the_ring_is_symmetric_seeded_and_order_free():
    members = [f"c{i}" for i in range(30)]
    nb = neighbourhoods(members, 6, CTX)
    assert all(len(v) == 6 for v in nb.values())
    assert all(u in nb[v] for u in nb for v in nb[u])
    assert nb == neighbourhoods(list(reversed(members)), 6, CTX)
    assert ring_order(members, CTX) != ring_order(members, p.Context("fed", "run1", 3, 1))
    small = neighbourhoods(members[:4], 6, CTX)  # n - 1 <= k: everyone neighbours everyone
    assert small["c0"] == ("c1", "c2", "c3")
    with pytest.raises(ValueError, match="even"):
        neighbourhoods(members, 5, CTX)


def test_default_k_grows_like_log_n_and_t_is_a_majority():
    assert [default_shares(n) for n in (10, 100, 1000)] == [8, 14, 20]
    assert [default_shares(n) for n in (2, 3, 4, 5, 6, 7)] == [2, 2, 2, 4, 4, 6]  # at most n - 1, even
    assert all(default_threshold(k) > k / 2 for k in (4, 8, 20))


def test_params_refuse_a_threshold_at_or_below_half_of_k():
    enc = Encoding()
    with pytest.raises(ParamsError, match="threshold"):
        SecAggParams(8, 4, 100, 64, enc)
    with pytest.raises(ParamsError, match="threshold"):
        SecAggParams(8, 9, 100, 64, enc)
    with pytest.raises(ParamsError, match="even"):
        SecAggParams(7, 5, 100, 64, enc)
    ok = SecAggParams.sized(100, 8, 5, enc)
    assert SecAggParams.from_json(ok.to_json()) == ok


def test_the_bound_holds_for_any_inputs_weights_and_widths():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.integers(1, 8), st.integers(0, 20), st.integers(1, 5000), st.integers(0, 2 ** 32 - 1),
           st.floats(0.01, 4.0))
    def check(clients, frac_bits, max_weight, seed, clip):
        enc = Encoding(clip=clip, frac_bits=frac_bits, max_weight=max_weight)
        bits = enc.width(clients)
        rng = np.random.default_rng(seed)
        deltas = [rng.uniform(-clip, clip, 50) for _ in range(clients)]
        weights = [int(w) for w in rng.integers(1, max_weight + 1, clients)]
        total = sum(encode(d, w, enc, bits, rng=rng).values for d, w in zip(deltas, weights))
        num, wsum = decode_sum(total, enc)
        assert wsum == sum(weights)
        exact = sum(w * d for d, w in zip(deltas, weights)) / wsum
        assert np.max(np.abs(num / wsum - exact)) <= enc.error_bound(clients, wsum) + 1e-12

    check()


def test_parameters_from_the_wire_are_checked():
    from flora.edge.secagg.messages import MessageError

    good = SecAggParams.sized(10, 4, 3, Encoding()).to_json()
    for bad in ({**good, "threshold": 2}, {**good, "bits": 16}, {**good, "extra": 1},
                {**good, "encoding": {**good["encoding"], "clip": float("nan")}}, {**good, "shares": "4"},
                {**good, "encoding": {**good["encoding"], "frac_bits": 24, "max_weight": 2 ** 32}}, []):
        with pytest.raises(MessageError):
            SecAggParams.from_json(bad)
