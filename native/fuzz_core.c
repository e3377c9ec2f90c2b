/* fuzz_core.c: drives the receiver core from a corpus file, for sanitizer builds and fuzzers. */
/*
 * Usage: fuzz_core CORPUS. The corpus is a sequence of records, each a u16 length (little
 * endian) and that many bytes; byte 0 of a record picks the operation, the rest are its
 * arguments (missing bytes read as zero, so any file is a valid corpus):
 *   'N' endpoints u8, ring log2 u8, hold u16, pending u16, max_streams u8, ahead u8 (0: the
 *       default window): a new core, with the initial streams (below)
 *   'D' endpoint u8, parent u32, arrival offset i16, then the datagram: jc_datagram
 *   'A' dt u16: jc_advance        'F' dt u16: jc_flush
 *   'T' max u8: jc_take_releases  'E' grow u8: jc_set_endpoints
 *   'S' stream u8, nkeys u8 (255: unkeyed, else % 6), has_session u8, session u8, then one
 *       epoch u8 per key: jc_set_stream, each key fuzz_key(epoch)
 *   'X' stream u8: jc_drop_stream
 *   'R' off u8 (odd: recovery off), delay u16, jitter u16, retry u16, attempts u8, max_gaps u16,
 *       seed u64: jc_set_recovery
 *   'K' max u8: jc_take_naks (each NAK is checked: a well-formed NAK header and ranges)
 * Initial streams: 1 keyed with epoch 1, 2 and 3 unkeyed (tests/test_native_sanitizers.py signs
 * part of its stream-1 datagrams with fuzz_key(1), so the MAC path accepts as well as refuses).
 * Every new core starts with recovery on (INITIAL_RECOVERY), so holes open, NAKs fall due, are
 * retried, coalesced and given up along any corpus of datagrams.
 * After every call the driver reads every payload byte it was handed and checks the bounds
 * the header promises; a broken promise aborts. tests/test_native_sanitizers.py builds it with
 * ASan and UBSan and feeds it random and mutated datagrams.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jasper_wire.h"
#include "receiver_core.h"

#define CHECK(cond)                                                                               \
	do {                                                                                      \
		if (!(cond)) {                                                                    \
			fprintf(stderr, "fuzz_core: %s:%d: %s\n", __FILE__, __LINE__, #cond);     \
			abort();                                                                  \
		}                                                                                 \
	} while (0)

struct reader {
	const uint8_t *p;
	size_t n, at;
};

static uint64_t take(struct reader *r, size_t bytes)
{
	uint64_t v = 0;
	for (size_t i = 0; i < bytes; i++, r->at++)
		v |= (uint64_t)(r->at < r->n ? r->p[r->at] : 0) << (8 * i);
	return v;
}

/* The key of an epoch: byte j is epoch * 31 + j (the Python side makes the same). */
static void fuzz_key(uint32_t epoch, uint8_t *key)
{
	for (int j = 0; j < JC_KEY_LEN; j++)
		key[j] = (uint8_t)(epoch * 31 + (uint32_t)j);
}

static const struct jc_recovery INITIAL_RECOVERY = {
	.nak_delay_ns = 50, .nak_jitter_ns = 30, .retry_ns = 200, .attempts = 3, .max_gaps = 8,
	.seed = 7,
};
static uint32_t gap_bound; /* the largest max_gaps set since recovery was last off */
static uint64_t naks_taken;

static uint64_t load_be(const uint8_t *p, int bytes)
{
	uint64_t v = 0;
	for (int i = 0; i < bytes; i++)
		v = v << 8 | p[i];
	return v;
}

/* A NAK as the publisher parses it (jasper.wire.decode_nak): what the core queued is sound. */
static void check_nak(const struct jc_nak *k, uint32_t endpoints)
{
	CHECK(k->endpoint < endpoints);
	CHECK(k->len >= JASPER_HEADER_LEN + JASPER_NAK_RANGE_LEN && k->len <= JC_MAX_NAK);
	const uint8_t *d = k->data;
	CHECK(load_be(d, 2) == JASPER_MAGIC && d[2] == JASPER_VERSION && d[3] == JASPER_FLAG_NAK);
	size_t n = (size_t)load_be(d + 42, 2);
	CHECK(n >= 1 && n <= JASPER_MAX_NAK_RANGES);
	CHECK(load_be(d + 40, 2) == n * JASPER_NAK_RANGE_LEN);
	CHECK(k->len == JASPER_HEADER_LEN + n * JASPER_NAK_RANGE_LEN);
	CHECK(load_be(d + 4, 4) == k->stream_id && load_be(d + 8, 4) == k->session);
	CHECK(load_be(d + 16, 8) == load_be(d + JASPER_HEADER_LEN, 8));
	uint64_t last_end = 0;
	for (size_t i = 0; i < n; i++) {
		const uint8_t *r = d + JASPER_HEADER_LEN + i * JASPER_NAK_RANGE_LEN;
		uint64_t first = load_be(r, 8), count = load_be(r + 8, 4);
		CHECK(count >= 1 && count <= JASPER_MAX_NAK_COUNT);
		CHECK(load_be(r + 12, 2) >= 1 && load_be(r + 14, 2) == 0);
		CHECK(i == 0 || first >= last_end); /* in sequence order, disjoint */
		last_end = first + count;
	}
	naks_taken++;
}

static void initial_streams(struct jc_core *core)
{
	struct jc_stream_key k = {.epoch = 1};
	fuzz_key(1, k.key);
	CHECK(jc_set_stream(core, 1, &k, 1, 0, 0) == 0);
	CHECK(jc_set_stream(core, 2, NULL, -1, 0, 0) == 0);
	CHECK(jc_set_stream(core, 3, NULL, -1, 0, 0) == 0);
	CHECK(jc_set_recovery(core, &INITIAL_RECOVERY) == 0);
	gap_bound = INITIAL_RECOVERY.max_gaps;
}

static struct jc_release out[256];
static size_t nout; /* releases of the last take, their payloads still valid */
static uint64_t checksum;

/* Read every byte handed out (ASan flags a buffer already reused or freed). */
static void touch_releases(const struct jc_config *cfg, uint32_t endpoints)
{
	for (size_t i = 0; i < nout; i++) {
		const struct jc_release *r = &out[i];
		CHECK(r->endpoint < endpoints);
		CHECK(r->kind <= JC_OVERFLOW);
		CHECK(r->payload_len <= JASPER_MAX_PAYLOAD);
		CHECK(r->count >= 1);
		for (size_t j = 0; j < r->payload_len; j++)
			checksum += r->payload[j];
	}
	(void)cfg;
}

static void check_core(const struct jc_core *core, const struct jc_config *cfg)
{
	uint32_t endpoints = jc_endpoints(core);
	CHECK(jc_held(core) <= cfg->hold_capacity);
	CHECK(jc_pending(core) <= cfg->pending_capacity);
	for (uint32_t e = 0; e < endpoints; e++) {
		struct jc_counters c;
		struct jc_parent p[JC_PARENT_SLOTS];
		CHECK(jc_counters(core, e, &c) == 0);
		uint64_t rejected = 0;
		for (int i = 0; i < JC_REJECT_REASONS; i++)
			rejected += c.rejected[i];
		CHECK(c.accepted + c.duplicates + c.stale + rejected <= c.received);
		int n = jc_parents(core, e, p, JC_PARENT_SLOTS);
		CHECK(n >= 0 && n <= JC_PARENT_SLOTS);
		uint64_t copies = 0;
		for (int i = 0; i < n; i++) {
			CHECK(p[i].kept <= p[i].copies);
			copies += p[i].copies;
		}
		CHECK(copies <= c.received);
	}
	struct jc_counters c;
	CHECK(jc_counters(core, endpoints, &c) == JC_EINVAL);
	uint64_t when;
	int any = jc_get_timer(core, &when);
	int64_t nak = jc_next_nak(core);
	CHECK(any == (jc_held(core) || jc_pending(core) || nak != INT64_MAX));
	CHECK(jc_open_gaps(core) <= gap_bound);
	CHECK((nak == INT64_MAX) == (jc_open_gaps(core) == 0 || !gap_bound));
	CHECK(!any || jc_next_copy_timer(core) >= jc_next_timer(core));
	touch_releases(cfg, endpoints);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: fuzz_core CORPUS\n");
		return 2;
	}
	FILE *f = fopen(argv[1], "rb");
	if (!f) {
		perror(argv[1]);
		return 2;
	}
	uint8_t *corpus = NULL;
	size_t size = 0, cap = 0;
	for (;;) {
		if (size == cap) {
			cap = cap ? cap * 2 : 1 << 16;
			uint8_t *p = realloc(corpus, cap);
			CHECK(p);
			corpus = p;
		}
		size_t got = fread(corpus + size, 1, cap - size, f);
		if (!got)
			break;
		size += got;
	}
	fclose(f);

	struct jc_config cfg = JC_CONFIG_DEFAULT;
	cfg.endpoints = 2;
	cfg.ring_size = 8;
	cfg.hold_capacity = 16;
	cfg.pending_capacity = 16;
	struct jc_core *core = jc_new(&cfg);
	CHECK(core);
	initial_streams(core);
	int64_t now = 1000;
	uint64_t records = 0, datagrams = 0, keyed_accepted = 0, mac_rejected = 0;
	size_t at = 0;
	while (at + 2 <= size) {
		size_t len = (size_t)corpus[at] | (size_t)corpus[at + 1] << 8;
		at += 2;
		if (len > size - at)
			len = size - at;
		struct reader r = {corpus + at, len, 0};
		at += len;
		records++;
		int op = (int)take(&r, 1);
		int rc = 0;
		switch (op) {
		case 'N': {
			struct jc_config next = {
				.endpoints = (uint32_t)take(&r, 1) % 8,
				.ring_size = UINT32_C(1) << (take(&r, 1) % 14),
				.hold_capacity = (uint32_t)take(&r, 2),
				.pending_capacity = (uint32_t)take(&r, 2),
				.max_streams = (uint32_t)take(&r, 1),
				.ahead_window = take(&r, 1),
			};
			if (!next.ahead_window)
				next.ahead_window = JC_AHEAD_WINDOW;
			struct jc_core *c2 = jc_new(&next);
			CHECK(!c2 == !!jc_config_check(&next));
			if (c2) {
				jc_free(core);
				nout = 0;
				core = c2;
				cfg = next;
				/* max_streams may refuse some (JC_EFULL): set what fits. */
				struct jc_stream_key k = {.epoch = 1};
				fuzz_key(1, k.key);
				int rc1 = jc_set_stream(core, 1, &k, 1, 0, 0);
				CHECK(rc1 == 0 || rc1 == JC_EFULL);
				rc1 = jc_set_stream(core, 2, NULL, -1, 0, 0);
				CHECK(rc1 == 0 || rc1 == JC_EFULL);
				rc1 = jc_set_stream(core, 3, NULL, -1, 0, 0);
				CHECK(rc1 == 0 || rc1 == JC_EFULL);
				CHECK(jc_set_recovery(core, &INITIAL_RECOVERY) == 0);
				gap_bound = INITIAL_RECOVERY.max_gaps;
			}
			break;
		}
		case 'D': {
			uint32_t endpoint = (uint32_t)take(&r, 1);
			uint32_t parent = (uint32_t)take(&r, 4);
			int64_t arrival = now + (int16_t)take(&r, 2);
			if (arrival < 0)
				arrival = 0;
			size_t off = r.at < r.n ? r.at : r.n;
			/* An exact-size heap copy so ASan sees any read past the datagram. */
			size_t n = r.n - off;
			uint8_t *d = malloc(n ? n : 1);
			CHECK(d);
			memcpy(d, r.p + off, n);
			nout = 0;
			struct jc_counters before = {0}, after = {0};
			jc_counters(core, endpoint, &before);
			size_t waiting = jc_pending(core);
			rc = jc_datagram(core, endpoint, d, n, parent, arrival, now);
			jc_counters(core, endpoint, &after);
			struct jc_header h;
			int pr = jc_parse(d, n, &h);
			/* Processed at once, alone (nothing pending): a stream-1 copy taken passed its
			 * MAC. */
			if (!pr && h.stream_id == 1 && after.accepted > before.accepted &&
			    arrival <= now && !waiting)
				keyed_accepted++;
			mac_rejected += after.rejected[JC_REJECT_MAC] - before.rejected[JC_REJECT_MAC];
			CHECK(pr >= 0 && pr <= JC_MALFORMED_REASONS);
			free(d);
			if (endpoint < jc_endpoints(core)) {
				CHECK(rc == 0);
				datagrams++;
			} else {
				CHECK(rc == JC_EINVAL);
			}
			break;
		}
		case 'A':
			now += (int64_t)take(&r, 2);
			nout = 0;
			rc = jc_advance(core, now);
			CHECK(rc == 0);
			break;
		case 'F':
			now += (int64_t)take(&r, 2);
			nout = 0;
			rc = jc_flush(core, now);
			CHECK(rc == 0);
			CHECK(jc_held(core) == 0 && jc_pending(core) == 0);
			break;
		case 'T': {
			size_t max = (size_t)take(&r, 1);
			nout = jc_take_releases(core, out, max);
			CHECK(nout <= max);
			break;
		}
		case 'E': {
			uint32_t n = jc_endpoints(core) + (uint32_t)(take(&r, 1) % 4);
			nout = 0;
			CHECK(jc_set_endpoints(core, n) == 0);
			CHECK(jc_endpoints(core) == n);
			if (n > 1)
				CHECK(jc_set_endpoints(core, n - 1) == JC_EINVAL);
			break;
		}
		case 'S': {
			uint32_t stream = (uint32_t)take(&r, 1) % 6;
			uint32_t nk = (uint32_t)take(&r, 1);
			int nkeys = nk == 255 ? -1 : (int)(nk % 6); /* 5: one too many */
			int has_session = (int)(take(&r, 1) & 1);
			uint32_t session = (uint32_t)take(&r, 1) % 4;
			struct jc_stream_key keys[6];
			int dup = 0, zero = 0;
			for (int i = 0; i < (nkeys > 0 ? nkeys : 0); i++) {
				keys[i].epoch = (uint32_t)take(&r, 1) % 5;
				fuzz_key(keys[i].epoch, keys[i].key);
				zero |= keys[i].epoch == 0;
				for (int j = 0; j < i; j++)
					dup |= keys[j].epoch == keys[i].epoch;
			}
			nout = 0;
			rc = jc_set_stream(core, stream, keys, nkeys, has_session, session);
			if (nkeys > JC_MAX_KEYS || dup || zero)
				CHECK(rc == JC_EINVAL);
			else
				CHECK(rc == 0 || rc == JC_EFULL);
			break;
		}
		case 'X':
			nout = 0;
			jc_drop_stream(core, (uint32_t)take(&r, 1) % 6);
			break;
		case 'R': {
			int off = (int)(take(&r, 1) & 1);
			struct jc_recovery rc2 = {
				.nak_delay_ns = take(&r, 2),
				.nak_jitter_ns = take(&r, 2),
				.retry_ns = take(&r, 2),
				.attempts = (uint32_t)take(&r, 1),
				.max_gaps = (uint32_t)take(&r, 2),
				.seed = take(&r, 8),
			};
			rc = jc_set_recovery(core, off ? NULL : &rc2);
			if (off) {
				CHECK(rc == 0 && jc_open_gaps(core) == 0);
				gap_bound = 0;
			} else if (rc2.attempts == 0 || rc2.max_gaps == 0) {
				CHECK(rc == JC_EINVAL);
			} else {
				CHECK(rc == 0);
				if (rc2.max_gaps > gap_bound)
					gap_bound = rc2.max_gaps;
				if (jc_open_gaps(core) > gap_bound) /* carried over from a larger one */
					gap_bound = (uint32_t)jc_open_gaps(core);
			}
			break;
		}
		case 'K': {
			static struct jc_nak naks[16];
			size_t max = (size_t)take(&r, 1) % 17;
			size_t got = jc_take_naks(core, naks, max);
			CHECK(got <= max);
			for (size_t i = 0; i < got; i++)
				check_nak(&naks[i], jc_endpoints(core));
			break;
		}
		default:
			break;
		}
		check_core(core, &cfg);
	}
	nout = 0;
	CHECK(jc_advance(core, now + 1000000) == 0); /* every open range NAKed or given up */
	CHECK(jc_flush(core, now + 1000000) == 0);
	while ((nout = jc_take_releases(core, out, 256)) > 0)
		touch_releases(&cfg, jc_endpoints(core));
	static struct jc_nak left[16];
	size_t got;
	while ((got = jc_take_naks(core, left, 16)) > 0)
		for (size_t i = 0; i < got; i++)
			check_nak(&left[i], jc_endpoints(core));
	jc_free(core);
	free(corpus);
	printf("records %llu datagrams %llu checksum %llu keyed_accepted %llu mac_rejected %llu "
	       "naks %llu\n",
	       (unsigned long long)records, (unsigned long long)datagrams,
	       (unsigned long long)checksum, (unsigned long long)keyed_accepted,
	       (unsigned long long)mac_rejected, (unsigned long long)naks_taken);
	return 0;
}
