/**
 * Micro-benchmark of the replication transport (src/replica/peer-link.ts) over loopback:
 * 4 KiB writes at 32 in flight through a real gRPC stream (ops/s, µs per op), the round trip of
 * one op at a time (what an iodepth-1 client pays on top of the local write), the same two over
 * cluster TLS (certificates from `duplex cert`, openssl needed) with the TLS/plaintext ratio, the
 * codec's encode + decode cost per 32-op batch message, and xxh64 cost per 4 KiB.
 * Run: `node dist/bench/peer-link.js` (after `npx tsc -p tsconfig.json`).
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { issueCert, makeCa } from '../src/cli/cert-command.js'
import { silentLogger } from '../src/core/log.js'
import { credentialFiles, TlsCredentials } from '../src/core/tls.js'
import { PeerLinkClient, PeerLinkServer } from '../src/replica/peer-link.js'
import type { PeerStream } from '../src/replica/peer-link.js'
import { decodeRequest, encodeRequest } from '../src/replica/peer-messages.js'
import type { WireOp } from '../src/replica/peer-messages.js'
import { loadXxh64 } from '../src/replica/xxh64.js'

const opBytes = 4096
const depth = 32
const streamOps = 100_000
const codecRounds = 2000
const hashRounds = 200_000

interface Row {
  what: string
  value: string
}

function microsPer(startNs: bigint, count: number): number {
  return Number(process.hrtime.bigint() - startNs) / 1000 / count
}

interface StreamTls {
  server: TlsCredentials
  client: TlsCredentials
}

/** Credentials for nodes `a` (the client) and `b` (the server) of a throwaway CA. */
async function makeTls(): Promise<StreamTls & { dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'duplex-bench-tls-'))
  const quiet = (): void => undefined
  const caDir = join(dir, 'ca')
  await makeCa(caDir, 'bench-ca', 30, quiet)
  for (const name of ['a', 'b']) {
    const options = { caDir, out: dir, kind: 'node' as const, ips: ['127.0.0.1'], dnsNames: [] }
    await issueCert(name, { ...options, days: 30 }, quiet)
  }
  const credentials = (name: string): TlsCredentials =>
    new TlsCredentials({
      files: credentialFiles(join(dir, name)),
      self: { role: 'node', name },
      log: silentLogger,
      reloadMs: 0,
    })
  return { dir, server: credentials('b'), client: credentials('a') }
}

async function benchStream(
  depth: number,
  streamOps: number,
  tls?: StreamTls,
): Promise<{ rows: Row[]; us: number }> {
  const label = tls === undefined ? 'stream' : 'stream over TLS'
  const server = new PeerLinkServer({
    ...(tls === undefined ? {} : { credentials: tls.server.serverCredentials(), secure: true }),
    onStream: (hello, replies) => ({
      type: 'accept',
      epoch: hello.epoch,
      appliedSeq: 0,
      handler: {
        onOp: (op) => {
          replies.ack(op.epoch, op.seq)
        },
        onFlush: () => undefined,
        onClosed: () => undefined,
      },
    }),
  })
  const port = await server.listen('127.0.0.1', 0)
  const client = new PeerLinkClient(
    tls === undefined
      ? {}
      : { credentials: tls.client.channelCredentials({ role: 'node', name: 'b' }) },
  )
  client.connect(`127.0.0.1:${port}`)
  const data = Buffer.alloc(opBytes, 0xab)
  let next = 1
  let acked = 0
  let finish: () => void = () => undefined
  const done = new Promise<void>((resolve) => (finish = resolve))
  const send = (stream: PeerStream): void => {
    const seq = next++
    stream.sendOp(
      { epoch: 1, seq, kind: 'write', offset: seq * opBytes, length: opBytes, fua: false },
      data,
    )
  }
  const stream: PeerStream = await client.openStream(
    { volume: 'bench', epoch: 1, fromNode: 'a', incarnation: Buffer.from('bench') },
    {
      onAck: () => {
        acked++
        if (acked === streamOps) finish()
        else if (next <= streamOps) send(stream)
      },
      onFlushAck: () => undefined,
      onReject: () => undefined,
      onRejectFlush: () => undefined,
      onClosed: () => undefined,
    },
  )
  const start = process.hrtime.bigint()
  while (next <= depth) send(stream)
  await done
  const us = microsPer(start, streamOps)
  const stats = stream.stats
  client.close()
  await server.close()
  const rows = [
    { what: `${label}: 4 KiB writes, ${depth} in flight`, value: `${Math.round(1e6 / us)} ops/s` },
    {
      what: depth === 1 ? `${label}: round trip (op to ack), 1 in flight` : `${label}: time per op`,
      value: `${us.toFixed(2)} µs`,
    },
    { what: `${label}: ops per OpBatch`, value: (stats.opsSent / stats.opBatchesSent).toFixed(1) },
    {
      what: `${label}: acks per AckBatch`,
      value: (stats.acksReceived / stats.ackBatchesReceived).toFixed(1),
    },
  ]
  return { rows, us }
}

function benchCodec(): Row[] {
  const ops: WireOp[] = []
  for (let seq = 1; seq <= depth; seq++) {
    const data = Buffer.alloc(opBytes, seq)
    ops.push({
      epoch: 1,
      seq,
      kind: 'write',
      offset: seq * opBytes,
      length: opBytes,
      data,
      xxh64: 0x1234n,
      fua: false,
      noHole: false,
    })
  }
  let bytes = encodeRequest({ type: 'ops', ops })
  let start = process.hrtime.bigint()
  for (let i = 0; i < codecRounds; i++) bytes = encodeRequest({ type: 'ops', ops })
  const encodeUs = microsPer(start, codecRounds)
  start = process.hrtime.bigint()
  for (let i = 0; i < codecRounds; i++) {
    if (!decodeRequest(bytes).ok) throw new Error('decode failed')
  }
  const decodeUs = microsPer(start, codecRounds)
  return [
    { what: `codec: encode OpBatch of ${depth} x 4 KiB`, value: `${encodeUs.toFixed(1)} µs` },
    { what: `codec: decode OpBatch of ${depth} x 4 KiB`, value: `${decodeUs.toFixed(1)} µs` },
    {
      what: 'codec: encode + decode per op',
      value: `${((encodeUs + decodeUs) / depth).toFixed(2)} µs`,
    },
  ]
}

async function benchHash(): Promise<Row[]> {
  const xxh64 = await loadXxh64()
  const data = Buffer.alloc(opBytes, 0x5a)
  let sink = 0n
  const start = process.hrtime.bigint()
  for (let i = 0; i < hashRounds; i++) sink ^= xxh64(data)
  const us = microsPer(start, hashRounds)
  return [
    {
      what: 'xxh64 per 4 KiB',
      value: `${us.toFixed(2)} µs (${(opBytes / us / 1000).toFixed(1)} GB/s)${sink === 1n ? '' : ''}`,
    },
  ]
}

const plain = await benchStream(depth, streamOps)
const plainOne = await benchStream(1, streamOps / 10)
const tls = await makeTls()
const secure = await benchStream(depth, streamOps, tls)
const secureOne = await benchStream(1, streamOps / 10, tls)
tls.server.close()
tls.client.close()
await rm(tls.dir, { recursive: true, force: true })
const rows = [
  ...plain.rows,
  ...plainOne.rows,
  ...secure.rows,
  ...secureOne.rows,
  {
    what: `TLS/plaintext throughput, ${depth} in flight`,
    value: `${(plain.us / secure.us).toFixed(2)}x`,
  },
  {
    what: 'TLS/plaintext round trip, 1 in flight',
    value: `${(secureOne.us / plainOne.us).toFixed(2)}x`,
  },
  ...benchCodec(),
  ...(await benchHash()),
]
const width = Math.max(...rows.map((row) => row.what.length))
for (const row of rows) console.log(`${row.what.padEnd(width)}  ${row.value}`)
