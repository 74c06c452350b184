/* A minimal safetensors reader for the C host tests (F32 tensors only; the host is little-endian like the file),
 * shared by test_api.c and test_pipeline.c. Needs the lowvram header first (LOWVRAM_MAX_DIMS). */
#ifndef LOWVRAM_TESTS_SAFETENSORS_H
#define LOWVRAM_TESTS_SAFETENSORS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct st_file {
    unsigned char *bytes; /* the whole file */
    size_t len;
    const char *header; /* JSON header, not NUL-terminated */
    size_t header_len;
};

struct st_tensor {
    int64_t shape[LOWVRAM_MAX_DIMS];
    size_t ndim;
    float *data; /* malloc'd copy; free() it */
    size_t count;
};

/* The whole file, malloc'd with a NUL after its `len` bytes (so text can be read as a string); NULL on error. */
static unsigned char *read_file(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    if (n < 0) {
        fclose(fp);
        return NULL;
    }
    unsigned char *bytes = malloc((size_t)n + 1);
    *len = fread(bytes, 1, (size_t)n, fp);
    fclose(fp);
    bytes[*len] = 0;
    if (*len != (size_t)n) {
        free(bytes);
        return NULL;
    }
    return bytes;
}

static int st_open(struct st_file *f, const char *path) {
    memset(f, 0, sizeof *f);
    f->bytes = read_file(path, &f->len);
    if (!f->bytes) return 0;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0 && f->len >= 8; i--) hlen = (hlen << 8) | f->bytes[i];
    if (f->len < 8 || hlen > f->len - 8) {
        free(f->bytes);
        f->bytes = NULL;
        return 0;
    }
    f->header = (const char *)f->bytes + 8;
    f->header_len = (size_t)hlen;
    return 1;
}

static void st_close(struct st_file *f) {
    free(f->bytes);
    memset(f, 0, sizeof *f);
}

/* Find `"name": {...}` in the header and copy its data. Returns 1 on success. */
static int st_get(const struct st_file *f, const char *name, struct st_tensor *t) {
    char key[128];
    snprintf(key, sizeof key, "\"%s\"", name);
    size_t klen = strlen(key);
    const char *end = f->header + f->header_len, *p = NULL;
    for (const char *q = f->header; q + klen <= end; q++) {
        if (memcmp(q, key, klen) == 0) {
            p = q + klen;
            break;
        }
    }
    if (!p) return 0;
    const char *close = memchr(p, '}', (size_t)(end - p));
    if (!close) return 0;
    size_t span = (size_t)(close - p);
    char obj[512];
    if (span >= sizeof obj) return 0;
    memcpy(obj, p, span);
    obj[span] = '\0';
    if (!strstr(obj, "\"F32\"")) return 0;
    char *s = strstr(obj, "\"shape\"");
    char *o = strstr(obj, "\"data_offsets\"");
    if (!s || !o) return 0;
    s = strchr(s, '[');
    o = strchr(o, '[');
    if (!s || !o) return 0;
    memset(t, 0, sizeof *t);
    size_t count = 1;
    for (char *c = s + 1; *c != ']';) {
        if (t->ndim == LOWVRAM_MAX_DIMS) return 0;
        long long d = strtoll(c, &c, 10);
        t->shape[t->ndim++] = d;
        count *= (size_t)d;
        while (*c == ',' || *c == ' ') c++;
    }
    char *c = o + 1;
    unsigned long long begin = strtoull(c, &c, 10);
    while (*c == ',' || *c == ' ') c++;
    unsigned long long stop = strtoull(c, &c, 10);
    size_t data_at = 8 + f->header_len;
    if (stop < begin || stop - begin != count * sizeof(float) || data_at + stop > f->len) return 0;
    t->data = malloc(count * sizeof(float));
    memcpy(t->data, f->bytes + data_at + begin, count * sizeof(float));
    t->count = count;
    return 1;
}

#endif
