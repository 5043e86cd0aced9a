/** The part of @nxtedition/rocksdb that meta-store.ts uses. The package ships no type declarations. */
declare module '@nxtedition/rocksdb' {
  export interface RocksLevelOptions {
    keyEncoding: 'utf8'
    valueEncoding: 'buffer'
  }
  export type RocksBatchOp =
    { type: 'put'; key: string; value: Buffer } | { type: 'del'; key: string }
  export class RocksLevel {
    constructor(location: string, options: RocksLevelOptions)
    open(): Promise<void>
    close(): Promise<void>
    /** Rejects with `code === 'LEVEL_NOT_FOUND'` when the key is missing. */
    get(key: string): Promise<Buffer>
    batch(ops: RocksBatchOp[], options: { sync: boolean }): Promise<void>
    iterator(options: { gte: string; lt: string }): AsyncIterable<[string, Buffer]> & {
      close(): Promise<void>
    }
  }
}
