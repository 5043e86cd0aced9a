/**
 * Synchronous replication in one process over the real gRPC peer link and two real stores:
 * a PrimaryVolume (what NBD clients use) and a SecondaryVolume. Proves that concurrent writes,
 * trims and zeroes end byte-identical on both replicas and equal to a model; that a write is
 * not reported done while the peer is unreachable; that a restarted peer (new incarnation) is
 * not trusted with re-sends; that a corrupted payload is rejected, retried, and never applied;
 * that the initial sync fills a peer while writes continue; and that the activity log is cooled.
 */
import t from 'tap'
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { silentLogger } from '../../src/core/log.js'
import { NodeStore } from '../../src/replica/store.js'
import { PeerLinkClient, PeerLinkServer, newIncarnation } from '../../src/replica/peer-link.js'
import type { HelloDecision, PeerLinkClientOptions } from '../../src/replica/peer-link.js'
import { PrimaryVolume, SecondaryVolume } from '../../src/replica/replicated-volume.js'
import type { Volume } from '../../src/replica/volume.js'
import { Prng, testSeed } from '../lib/prng.js'

const MiB = 1024 * 1024
const sizeBytes = 16 * MiB

interface Pair {
  primary: PrimaryVolume
  a: NodeStore
  b: NodeStore
  server: PeerLinkServer
  port: number
  client: PeerLinkClient
  startSecondary(): Promise<void>
  stop(): Promise<void>
}

function volumeOf(store: NodeStore): Volume {
  const volume = store.get('vol')
  if (volume === undefined) throw new Error('no volume')
  return volume
}

async function startPair(
  clientOptions: PeerLinkClientOptions = {},
  primaryOptions: { hotExtentsTarget?: number } = {},
): Promise<Pair> {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'duplex-repl-'))
  const a = await NodeStore.open(path.join(root, 'a'))
  const b = await NodeStore.open(path.join(root, 'b'))
  await a.create('vol', sizeBytes)
  await b.create('vol', sizeBytes)
  let server = new PeerLinkServer({
    onStream: () => ({ type: 'reject', code: 'SHUTTING_DOWN', message: '', epoch: 0 }),
  })
  let port = 0
  const pair: Pair = {
    a,
    b,
    get server() {
      return server
    },
    get port() {
      return port
    },
    client: new PeerLinkClient(clientOptions),
    primary: undefined as unknown as PrimaryVolume,
    async startSecondary() {
      const secondary = new SecondaryVolume({
        local: volumeOf(b),
        epoch: 1,
        primary: 'node-a',
        log: silentLogger,
      })
      server = new PeerLinkServer({
        onStream: (hello, replies): HelloDecision =>
          hello.volume === 'vol'
            ? secondary.accept(hello, replies)
            : { type: 'reject', code: 'VOLUME_NOT_FOUND', message: 'no such volume', epoch: 0 },
      })
      port = await server.listen('127.0.0.1', port)
    },
    async stop() {
      pair.primary.close()
      pair.client.close()
      server.forceClose()
      await a.close()
      await b.close()
      await fs.rm(root, { recursive: true, force: true })
    },
  }
  await pair.startSecondary()
  pair.client.connect(`127.0.0.1:${port}`)
  const activityLog = a.activityLog('vol')
  if (activityLog === undefined) throw new Error('no activity log')
  pair.primary = await PrimaryVolume.start({
    local: volumeOf(a),
    activityLog,
    epoch: 1,
    nodeName: 'node-a',
    peerAddress: `127.0.0.1:${port}`,
    client: pair.client,
    incarnation: newIncarnation(),
    log: silentLogger,
    ...primaryOptions,
  })
  return pair
}

async function waitFor(condition: () => boolean, timeoutMs = 10_000): Promise<void> {
  const start = Date.now()
  while (!condition()) {
    if (Date.now() - start > timeoutMs) throw new Error('timed out waiting')
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

/** Settles within `ms`, or resolves to 'pending'. */
function within<T>(promise: Promise<T>, ms: number): Promise<T | 'pending'> {
  return Promise.race([
    promise,
    new Promise<'pending'>((resolve) =>
      setTimeout(() => {
        resolve('pending')
      }, ms),
    ),
  ])
}

void t.test('concurrent writes, trims and zeroes end identical on both replicas', async (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (DUPLEX_SEED=${seed} replays)`)
  const prng = new Prng(seed)
  const pair = await startPair()
  t.teardown(() => pair.stop())
  await waitFor(() => pair.primary.connected)
  const model = Buffer.alloc(sizeBytes)
  // Rounds of up to 32 concurrent ops on disjoint ranges (the NBD client decides concurrent
  // overlaps; the model cannot), then a flush.
  for (let round = 0; round < 30; round++) {
    const ops: Promise<void>[] = []
    const slot = sizeBytes / 32
    for (let i = 0; i < 32; i++) {
      const length = (1 + prng.int(64)) * 1024
      const offset = i * slot + prng.int(slot - length)
      const choice = prng.int(10)
      if (choice < 7) {
        const data = Buffer.alloc(length, 1 + prng.int(255))
        data.copy(model, offset)
        ops.push(pair.primary.write(offset, data, prng.int(8) === 0))
      } else if (choice < 9) {
        model.fill(0, offset, offset + length)
        ops.push(
          pair.primary.zero(offset, length, {
            fua: false,
            noHole: prng.int(2) === 0,
            fastZero: false,
          }),
        )
      } else {
        model.fill(0, offset, offset + length)
        ops.push(pair.primary.trim(offset, length, false))
      }
    }
    await Promise.all(ops)
    if (round % 5 === 4) await pair.primary.flush()
  }
  await pair.primary.flush()
  const onA = await volumeOf(pair.a).read(0, sizeBytes)
  const onB = await volumeOf(pair.b).read(0, sizeBytes)
  t.ok(onA.equals(model), 'the primary holds what the client wrote')
  t.ok(onB.equals(model), 'the secondary holds exactly the same bytes')
  const hot = await pair.a.activityLog('vol')?.hotExtents()
  t.ok(hot !== undefined && hot.length > 0, 'the activity log recorded hot extents before writing')
})

void t.test('a write is not reported done while the peer is unreachable', async (t) => {
  const pair = await startPair()
  t.teardown(() => pair.stop())
  await waitFor(() => pair.primary.connected)
  await pair.primary.write(0, Buffer.alloc(4096, 1), false)

  pair.server.forceClose()
  await waitFor(() => !pair.primary.connected)
  const write = pair.primary.write(8192, Buffer.alloc(4096, 2), false)
  t.equal(await within(write, 1500), 'pending', 'no reply without the peer')

  // The peer comes back as a new process (new incarnation): it may have lost unflushed
  // writes, so the primary must not treat re-sends as enough. The write fails; never "done".
  await pair.startSecondary()
  await t.rejects(write, { code: 'IO_ERROR', message: /restarted/ })
  await t.rejects(pair.primary.write(0, Buffer.alloc(4096, 3), false), { code: 'IO_ERROR' })
})

void t.test(
  'a corrupted payload is rejected by checksum, retried, and never applied',
  async (t) => {
    let corrupted = 0
    const pair = await startPair({
      mutateOutgoing: (op, data) => {
        if (op.kind !== 'write' || op.seq % 3 !== 0 || corrupted >= 20) return data
        corrupted += 1
        const copy = Buffer.from(data)
        copy[0] = (copy[0] ?? 0) ^ 0xff
        return copy
      },
    })
    t.teardown(() => pair.stop())
    await waitFor(() => pair.primary.connected)
    const writes: Promise<void>[] = []
    for (let i = 0; i < 60; i++)
      writes.push(pair.primary.write(i * 65536, Buffer.alloc(65536, i + 1), false))
    await Promise.all(writes)
    await pair.primary.flush()
    t.ok(corrupted > 0, `${corrupted} payloads were corrupted on the way`)
    t.ok(pair.primary.counters.checksumRetries > 0, 'the primary re-sent rejected payloads')
    const onA = await volumeOf(pair.a).read(0, 60 * 65536)
    const onB = await volumeOf(pair.b).read(0, 60 * 65536)
    t.ok(onB.equals(onA), 'no corrupted byte reached the secondary')
  },
)

void t.test('sync copies the primary to an empty peer while writes continue', async (t) => {
  const pair = await startPair()
  t.teardown(() => pair.stop())
  await waitFor(() => pair.primary.connected)
  // Data the peer never saw: written to the primary's replica alone (as on a node whose peer
  // was replaced by an empty one). Every other MiB, so holes are copied as holes.
  const local = volumeOf(pair.a)
  for (let mib = 0; mib < sizeBytes / MiB; mib += 2) {
    await local.write(mib * MiB, Buffer.alloc(MiB, mib + 1), false)
  }
  const prng = new Prng(testSeed())
  const writes: Promise<void>[] = []
  const written = new Set<number>()
  const sync = pair.primary.sync([{ offset: 0, length: sizeBytes }])
  for (let i = 0; i < 200; i++) {
    const offset = prng.int(sizeBytes / 4096) * 4096
    written.add(offset)
    writes.push(pair.primary.write(offset, Buffer.alloc(4096, 0x80 + (i % 64)), false))
    if (i % 20 === 0) await new Promise((resolve) => setImmediate(resolve))
  }
  await Promise.all([sync, ...writes])
  await pair.primary.flush()
  const onA = await volumeOf(pair.a).read(0, sizeBytes)
  const onB = await volumeOf(pair.b).read(0, sizeBytes)
  t.ok(onB.equals(onA), 'the replicas are identical after the sync and the concurrent writes')
  // A MiB of pre-existing data that no concurrent write touched (a random write may land on any).
  const mib = [2, 4, 6, 8].find((m) => !written.has(m * MiB)) ?? 2
  t.equal(onB[MiB * mib], mib + 1, `the pre-existing data (MiB ${mib}) reached the peer`)
})

void t.test('a rate-limited sync copies no faster than its rate', async (t) => {
  const pair = await startPair()
  t.teardown(() => pair.stop())
  await waitFor(() => pair.primary.connected)
  const local = volumeOf(pair.a)
  await local.write(0, Buffer.alloc(8 * MiB, 9), false)
  const rate = 16 * MiB
  const started = performance.now()
  let copied = 0
  await pair.primary.sync(
    [{ offset: 0, length: 8 * MiB }],
    (range) => {
      copied += range.length
    },
    rate,
  )
  const seconds = (performance.now() - started) / 1000
  t.equal(copied, 8 * MiB, 'everything was copied')
  t.ok(
    seconds >= 0.45,
    `8 MiB at 16 MiB/s took ${seconds.toFixed(2)} s (at least 0.5 s, less one chunk)`,
  )
  const onB = await volumeOf(pair.b).read(0, 8 * MiB)
  t.ok(onB.equals(await local.read(0, 8 * MiB)), 'and identical')
})

void t.test('the activity log is cooled once it grows past its target', async (t) => {
  const pair = await startPair({}, { hotExtentsTarget: 1 })
  t.teardown(() => pair.stop())
  await waitFor(() => pair.primary.connected)
  const extentBytes = 4 * MiB
  for (let extent = 0; extent < sizeBytes / extentBytes; extent++) {
    await pair.primary.write(extent * extentBytes, Buffer.alloc(4096, 7), false)
  }
  const activityLog = pair.a.activityLog('vol')
  if (activityLog === undefined) throw new Error('no activity log')
  t.equal((await activityLog.hotExtents()).length, 4, 'every written extent is durably hot')
  let hot = 4
  const start = Date.now()
  while (hot > 1 && Date.now() - start < 10_000) {
    await new Promise((resolve) => setTimeout(resolve, 200))
    hot = (await activityLog.hotExtents()).length
  }
  t.ok(hot <= 1, `the idle extents were flushed and cooled (${hot} hot)`)
  await pair.primary.write(0, Buffer.alloc(4096, 8), false)
  t.ok((await activityLog.hotExtents()).includes(0), 'a new write heats its extent again')
})
