/**
 * xxh64 (seed 0) of replication payloads, via xxhash-wasm. The WebAssembly module loads once per
 * process and asynchronously; after `loadXxh64()` resolves, hashing is synchronous.
 */
import xxhash from 'xxhash-wasm'

/** xxh64 with seed 0 of `data`. */
export type Xxh64 = (data: Uint8Array) => bigint

let loading: Promise<Xxh64> | undefined

export function loadXxh64(): Promise<Xxh64> {
  loading ??= xxhash().then((api) => (data: Uint8Array) => api.h64Raw(data))
  return loading
}
