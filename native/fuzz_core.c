/* fuzz_core.c: drives the receiver core from a corpus file, for sanitizer builds and fuzzers. */
/*
 * Usage: fuzz_core CORPUS. The corpus is a sequence of records, each a u16 length (little
 * endian) and that many bytes; byte 0 of a record picks the operation, the rest are its
 * arguments (missing bytes read as zero, so any file is a valid corpus):
 *   'N' endpoints u8, ring log2 u8, hold u16, pending u16, max_streams u8: a new core
 *   'D' endpoint u8, parent u32, arrival offset i16, then the datagram: jc_datagram
 *   'A' dt u16: jc_advance        'F' dt u16: jc_flush
 *   'T' max u8: jc_take_releases  'E' grow u8: jc_set_endpoints
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
		CHECK(c.accepted + c.duplicates + c.stale <= c.received);
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
	CHECK(any == (jc_held(core) || jc_pending(core)));
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
	int64_t now = 1000;
	uint64_t records = 0, datagrams = 0;
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
			};
			struct jc_core *c2 = jc_new(&next);
			CHECK(!c2 == !!jc_config_check(&next));
			if (c2) {
				jc_free(core);
				nout = 0;
				core = c2;
				cfg = next;
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
			rc = jc_datagram(core, endpoint, d, n, parent, arrival, now);
			struct jc_header h;
			int pr = jc_parse(d, n, &h);
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
		default:
			break;
		}
		check_core(core, &cfg);
	}
	nout = 0;
	CHECK(jc_flush(core, now) == 0);
	while ((nout = jc_take_releases(core, out, 256)) > 0)
		touch_releases(&cfg, jc_endpoints(core));
	jc_free(core);
	free(corpus);
	printf("records %llu datagrams %llu checksum %llu\n", (unsigned long long)records,
	       (unsigned long long)datagrams, (unsigned long long)checksum);
	return 0;
}
