/**
 * The node-to-node control service over real gRPC on 127.0.0.1 (src/replica/peer-control.ts):
 * every call round-trips its fields, handler errors travel with their code, hostile requests are
 * answered INVALID_ARGUMENT without reaching a handler, hostile replies reject with IO_ERROR,
 * corrupt payloads are retried and never applied, and a gone peer is UNAVAILABLE in time.
 */
import * as grpc from '@grpc/grpc-js'
import protobuf from 'protobufjs'
import t from 'tap'
import type { Test } from 'tap'
import { AssertionError } from '../../src/core/assert.js'
import { DuplexError, isDuplexError } from '../../src/core/errors.js'
import type { ErrorCode } from '../../src/core/errors.js'
import type { Logger } from '../../src/core/log.js'
import { silentLogger } from '../../src/core/log.js'
import {
  addPeerControlService,
  forwardChecksumRetriesMax,
  forwardDataBytesMax,
  PeerControlClient,
  peerControlProto,
  peerControlServerOptions,
  peerService,
} from '../../src/replica/peer-control.js'
import type {
  MoveAdoptReply,
  MoveAdoptRequest,
  MoveBeginRequest,
  MoveCutoverReply,
  MoveCutoverRequest,
  MoveFinishRequest,
  MoveWriteRequest,
  DescribeReply,
  ForwardReply,
  ForwardRequest,
  HandoverReply,
  HandoverRequest,
  PeerControlClientOptions,
  PeerControlHandlers,
  PromoteReply,
  ChecksumReply,
  ChecksumRequest,
  RenewLeaseReply,
  RenewLeaseRequest,
  RepairReply,
  RepairRequest,
  ResolveRequest,
  PromoteRequest,
  SyncCompleteRequest,
} from '../../src/replica/peer-control.js'
import { loadXxh64 } from '../../src/replica/xxh64.js'

const root = peerControlProto
const messageType = (name: string): protobuf.Type => root.lookupType(`duplex.v1.${name}`)
const identity = (buffer: Buffer): Buffer => buffer

/** A fixed64 as protobufjs writes it. */
function longBits(value: bigint): { low: number; high: number } {
  return { low: Number(value & 0xffffffffn) | 0, high: Number(value >> 32n) | 0 }
}

/** Deterministic bytes for a read of `length` at `offset`. */
function pattern(offset: number, length: number): Buffer {
  const data = Buffer.alloc(length)
  for (let i = 0; i < length; i += 4096) data[i] = ((offset + i) / 4096) & 0xff
  if (length > 0) data[length - 1] = 0x5a
  return data
}

/** A node that records every call; `failWith` makes every handler throw it. */
class FakeNode implements PeerControlHandlers {
  readonly calls: { rpc: string; request: unknown }[] = []
  failWith: Error | undefined
  /** Resolves a handler call only when released (deadline tests). */
  hang: Promise<void> | undefined

  private async enter(rpc: string, request: unknown): Promise<void> {
    this.calls.push({ rpc, request })
    if (this.hang !== undefined) await this.hang
    if (this.failWith !== undefined) throw this.failWith
  }

  forwarded(): ForwardRequest[] {
    return this.calls.filter((c) => c.rpc === 'forward').map((c) => c.request as ForwardRequest)
  }

  async describe(volume: string): Promise<DescribeReply> {
    await this.enter('describe', volume)
    if (volume === 'missing') {
      return {
        exists: false,
        epoch: 9,
        primary: 'x',
        state: 'UpToDate',
        sizeBytes: 1,
        hotExtents: [3],
        extentBytes: 4,
        dirty: true,
        bootId: 'b',
        history: [{ generation: 1, owner: 'x', forced: false }],
        syncBytesDone: 1,
        syncBytesTotal: 2,
        moveBytesDone: 1,
        moveBytesTotal: 3,
      }
    }
    return {
      exists: true,
      epoch: 2 ** 53 - 1,
      primary: 'site-b',
      state: 'Outdated',
      sizeBytes: 2 ** 50,
      hotExtents: [0, 2 ** 40],
      extentBytes: 4 * 1024 * 1024,
      dirty: true,
      bootId: '0b0c1d5e-1b58-4f6e-9b8a-2f5d8c0e7a11',
      history: [
        { generation: 3, owner: 'site-a', forced: false },
        { generation: 4, owner: 'site-b', forced: true },
      ],
      syncBytesDone: 2 ** 40,
      syncBytesTotal: 2 ** 50,
      moveBytesDone: 5,
      moveBytesTotal: 2 ** 45,
    }
  }

  async checksum(request: ChecksumRequest): Promise<ChecksumReply> {
    await this.enter('checksum', request)
    return { sums: [0n, 2n ** 64n - 1n, 12345678901234567890n] }
  }

  async repair(request: RepairRequest): Promise<RepairReply> {
    await this.enter('repair', request)
    return { bytes: request.ranges.reduce((sum, range) => sum + range.length, 0) }
  }

  async resolve(request: ResolveRequest): Promise<void> {
    await this.enter('resolve', request)
  }

  async renewLease(request: RenewLeaseRequest): Promise<RenewLeaseReply> {
    await this.enter('renewLease', request)
    return { granted: request.fromNode === 'site-a', epoch: request.epoch }
  }

  async forward(request: ForwardRequest): Promise<ForwardReply> {
    await this.enter('forward', { ...request, data: Buffer.from(request.data) })
    if (request.kind === 'read') return { data: pattern(request.offset, request.length) }
    return { data: Buffer.alloc(0) }
  }

  async handover(request: HandoverRequest): Promise<HandoverReply> {
    await this.enter('handover', request)
    return { epoch: request.epoch + 1 }
  }

  async promote(request: PromoteRequest): Promise<PromoteReply> {
    await this.enter('promote', request)
    return { epoch: 8, primary: 'site-b' }
  }

  async syncComplete(request: SyncCompleteRequest): Promise<void> {
    await this.enter('syncComplete', request)
  }

  async moveBegin(request: MoveBeginRequest): Promise<void> {
    await this.enter('moveBegin', request)
  }

  async moveWrite(request: MoveWriteRequest): Promise<void> {
    await this.enter('moveWrite', { ...request, data: Buffer.from(request.data) })
  }

  async moveAdopt(request: MoveAdoptRequest): Promise<MoveAdoptReply> {
    await this.enter('moveAdopt', request)
    return { bootId: 'boot-1' }
  }

  async moveCutover(request: MoveCutoverRequest): Promise<MoveCutoverReply> {
    await this.enter('moveCutover', request)
    return { epoch: request.epoch + 1 }
  }

  async moveFinish(request: MoveFinishRequest): Promise<MoveAdoptReply> {
    await this.enter('moveFinish', request)
    return { bootId: '' }
  }
}

async function bind(server: grpc.Server): Promise<string> {
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) => {
      if (error === null) resolve(bound)
      else reject(error)
    })
  })
  return `127.0.0.1:${port}`
}

/** A server with the Peer service over `node`, and a client to it; both end with the test. */
async function startPeer(
  t: Test,
  options: PeerControlClientOptions = {},
  log: Logger = silentLogger,
): Promise<{ node: FakeNode; client: PeerControlClient; server: grpc.Server; address: string }> {
  const node = new FakeNode()
  const server = new grpc.Server(peerControlServerOptions)
  await addPeerControlService(server, node, log)
  const address = await bind(server)
  const client = new PeerControlClient(address, options)
  t.teardown(() => {
    client.close()
    server.forceShutdown()
  })
  return { node, client, server, address }
}

/** The DuplexError `promise` rejects with (anything else fails the test). */
async function failure(promise: Promise<unknown>): Promise<DuplexError> {
  try {
    await promise
  } catch (error) {
    if (isDuplexError(error)) return error
    throw error
  }
  throw new Error('expected a rejection')
}

/** A raw unary call to the Peer service, bypassing the typed client; the decoded reply. */
async function rawCall(
  address: string,
  rpc: string,
  bytes: Uint8Array,
  replyType = `${rpc}Reply`,
): Promise<unknown> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure())
  try {
    const reply = await new Promise<Buffer>((resolve, reject) => {
      client.makeUnaryRequest(
        `/duplex.v1.Peer/${rpc}`,
        identity,
        identity,
        Buffer.from(bytes),
        (error, value) => {
          if (error !== null) reject(error)
          else if (value === undefined) reject(new Error('no reply'))
          else resolve(value)
        },
      )
    })
    const type = messageType(replyType)
    return type.toObject(type.decode(reply))
  } finally {
    client.close()
  }
}

const forwardBase: ForwardRequest = {
  volume: 'demo',
  fromNode: 'site-a',
  kind: 'write',
  offset: 8192,
  length: 3,
  data: Buffer.from('abc'),
  fua: false,
  noHole: false,
  fastZero: false,
}

void t.test('every call round-trips its fields', async (t) => {
  const { node, client } = await startPeer(t)

  t.same(await client.describe('demo'), {
    exists: true,
    epoch: 2 ** 53 - 1,
    primary: 'site-b',
    state: 'Outdated',
    sizeBytes: 2 ** 50,
    hotExtents: [0, 2 ** 40],
    extentBytes: 4 * 1024 * 1024,
    dirty: true,
    bootId: '0b0c1d5e-1b58-4f6e-9b8a-2f5d8c0e7a11',
    history: [
      { generation: 3, owner: 'site-a', forced: false },
      { generation: 4, owner: 'site-b', forced: true },
    ],
    syncBytesDone: 2 ** 40,
    syncBytesTotal: 2 ** 50,
    moveBytesDone: 5,
    moveBytesTotal: 2 ** 45,
  })
  t.same(
    await client.describe('missing'),
    {
      exists: false,
      epoch: 0,
      primary: '',
      state: 'Inconsistent',
      sizeBytes: 0,
      hotExtents: [],
      extentBytes: 0,
      dirty: false,
      bootId: '',
      history: [],
      syncBytesDone: 0,
      syncBytesTotal: 0,
      moveBytesDone: 0,
      moveBytesTotal: 0,
    },
    'a volume the peer does not hold: the other fields are not sent',
  )
  t.same(await client.renewLease({ volume: 'demo', fromNode: 'site-a', epoch: 7 }), {
    granted: true,
    epoch: 7,
  })
  t.same(await client.renewLease({ volume: 'demo', fromNode: 'site-c', epoch: 7 }), {
    granted: false,
    epoch: 7,
  })
  const checksum = { volume: 'demo', offset: 2 ** 40, length: 3 * 4096, chunkBytes: 4096 }
  t.same(await client.checksum(checksum), {
    sums: [0n, 2n ** 64n - 1n, 12345678901234567890n],
  })
  const repair = {
    volume: 'demo',
    ranges: [
      { offset: 0, length: 10 },
      { offset: 2 ** 50, length: 5 },
    ],
  }
  t.same(await client.repair(repair), { bytes: 15 })
  await client.resolve({ volume: 'demo', keep: 'site-a' })
  await t.rejects(
    client.checksum({ ...checksum, length: 128 * 1024 * 1024 }),
    AssertionError,
    'a checksum of more than 64 MiB is refused before it is sent',
  )

  const xxh64 = await loadXxh64()
  const big = Buffer.alloc(forwardDataBytesMax, 0xa5)
  big[12345] = 1
  const forwards: ForwardRequest[] = [
    { ...forwardBase, fua: true },
    { ...forwardBase, length: big.length, data: big, offset: 2 ** 52 },
    { ...forwardBase, kind: 'trim', length: 1 << 30, data: Buffer.alloc(0), fua: true },
    { ...forwardBase, kind: 'zero', length: 4096, data: Buffer.alloc(0), noHole: true },
    { ...forwardBase, kind: 'zero', length: 4096, data: Buffer.alloc(0), fastZero: true },
    { ...forwardBase, kind: 'flush', offset: 0, length: 0, data: Buffer.alloc(0), fua: true },
  ]
  for (const request of forwards) {
    const reply = await client.forward(request)
    t.equal(reply.data.length, 0, `${request.kind}: no data back`)
  }
  const received = node.forwarded()
  t.equal(received.length, forwards.length, 'every forward reached the handler')
  forwards.forEach((sent, i) => {
    const got = received[i]
    t.same({ ...got, data: undefined }, { ...sent, data: undefined }, `${sent.kind} ${i} fields`)
    t.equal(got && xxh64(got.data), xxh64(sent.data), `${sent.kind} ${i} data`)
  })

  const read = { ...forwardBase, kind: 'read' as const, data: Buffer.alloc(0) }
  const small = await client.forward({ ...read, offset: 4096, length: 10000 })
  t.ok(small.data.equals(pattern(4096, 10000)), 'a read returns the handler bytes')
  const large = await client.forward({ ...read, offset: 0, length: forwardDataBytesMax })
  t.equal(xxh64(large.data), xxh64(pattern(0, forwardDataBytesMax)), 'a 32 MiB read')

  const handover = { volume: 'demo', epoch: 41, toNode: 'site-b', fromNode: 'site-a' }
  t.same(await client.handover(handover), { epoch: 42 })
  t.same(await client.promote({ volume: 'demo' }), { epoch: 8, primary: 'site-b' })
  const sync = { volume: 'demo', epoch: 7, fromNode: 'site-a' }
  await client.syncComplete(sync)

  t.same(
    node.calls.filter((c) => c.rpc !== 'forward'),
    [
      { rpc: 'describe', request: 'demo' },
      { rpc: 'describe', request: 'missing' },
      { rpc: 'renewLease', request: { volume: 'demo', fromNode: 'site-a', epoch: 7 } },
      { rpc: 'renewLease', request: { volume: 'demo', fromNode: 'site-c', epoch: 7 } },
      { rpc: 'checksum', request: checksum },
      { rpc: 'repair', request: repair },
      { rpc: 'resolve', request: { volume: 'demo', keep: 'site-a' } },
      { rpc: 'handover', request: handover },
      { rpc: 'promote', request: { volume: 'demo', force: false } },
      { rpc: 'syncComplete', request: sync },
    ],
    'the handlers saw exactly what was sent',
  )
})

void t.test(
  'a DuplexError from a handler reaches the caller with its code and message',
  async (t) => {
    const { node, client } = await startPeer(t)
    const codes: ErrorCode[] = [
      'FAILED_PRECONDITION',
      'VOLUME_NOT_FOUND',
      'UNAVAILABLE',
      'NO_SPACE',
    ]
    for (const code of codes) {
      node.failWith = new DuplexError(code, `refused: ${code} ünïcødé`)
      const error = await failure(client.promote({ volume: 'demo' }))
      t.equal(error.code, code)
      t.equal(error.message, `refused: ${code} ünïcødé`)
    }
    node.failWith = new DuplexError('READ_ONLY', 'x'.repeat(10000))
    const long = await failure(client.forward(forwardBase))
    t.equal(long.code, 'READ_ONLY')
    t.equal(long.message, 'x'.repeat(4093), 'a long message is cut to 4096 bytes')
    node.failWith = new DuplexError('CHECKSUM_MISMATCH', 'replica disk returned bad data')
    const checksum = await failure(client.syncComplete({ volume: 'demo', epoch: 1, fromNode: 'a' }))
    t.equal(checksum.code, 'CHECKSUM_MISMATCH', 'non-forward calls pass CHECKSUM_MISMATCH through')
    t.equal(node.calls.length, codes.length + 2, 'one handler call each: nothing retried')
  },
)

void t.test(
  'a plain Error from a handler is IO_ERROR, logged, and the server survives',
  async (t) => {
    const logged: string[] = []
    const log: Logger = {
      ...silentLogger,
      error: (message, fields) => logged.push(`${message} ${JSON.stringify(fields)}`),
      child: () => log,
    }
    const { node, client } = await startPeer(t, {}, log)
    node.failWith = new TypeError('cannot read properties of undefined')
    const error = await failure(
      client.handover({ volume: 'v', epoch: 1, toNode: 'b', fromNode: 'a' }),
    )
    t.equal(error.code, 'IO_ERROR')
    t.match(error.message, /Handover failed on the peer: cannot read properties of undefined/)
    t.equal(logged.length, 1, 'logged once')
    t.match(logged[0], /handler failed.*Handover.*cannot read properties/)
    node.failWith = undefined
    t.same(
      await client.promote({ volume: 'demo' }),
      { epoch: 8, primary: 'site-b' },
      'still serving',
    )
  },
)

void t.test(
  'malformed requests are answered INVALID_ARGUMENT and never reach a handler',
  async (t) => {
    const { node, client, address } = await startPeer(t)
    const Forward = messageType('ForwardRequest')
    const xxh64 = await loadXxh64()
    const abc = Buffer.from('abc')
    const forward = (fields: Record<string, unknown>): Uint8Array =>
      Forward.encode({
        volume: 'demo',
        fromNode: 'a',
        kind: 2,
        length: 3,
        data: abc,
        xxh64: longBits(xxh64(abc)),
        ...fields,
      }).finish()

    const cases: { what: string; rpc: string; bytes: Uint8Array; reason: RegExp }[] = [
      { what: 'garbage', rpc: 'Forward', bytes: Buffer.from([0xff, 0xff, 0xff]), reason: /not a/ },
      { what: 'truncated', rpc: 'Describe', bytes: Buffer.from([0x0a, 0x80]), reason: /not a/ },
      { what: 'write longer', rpc: 'Forward', bytes: forward({ length: 4 }), reason: /carries 3/ },
      { what: 'write shorter', rpc: 'Forward', bytes: forward({ length: 2 }), reason: /carries 3/ },
      { what: 'trim with data', rpc: 'Forward', bytes: forward({ kind: 3 }), reason: /carries 3/ },
      {
        what: 'unknown kind',
        rpc: 'Forward',
        bytes: forward({ kind: 9 }),
        reason: /kind 9 unknown/,
      },
      { what: 'no kind', rpc: 'Forward', bytes: forward({ kind: 0 }), reason: /kind missing/ },
      {
        what: 'offset beyond 2^53',
        rpc: 'Forward',
        bytes: forward({ offset: '18446744073709551615' }),
        reason: /offset exceeds 2\^53/,
      },
      {
        what: 'end beyond 2^53',
        rpc: 'Forward',
        bytes: forward({ offset: 2 ** 53 - 2 }),
        reason: /beyond 2\^53/,
      },
      {
        what: 'noHole on a write',
        rpc: 'Forward',
        bytes: forward({ noHole: true }),
        reason: /noHole or fastZero on a write/,
      },
      {
        what: 'xxh64 on a read',
        rpc: 'Forward',
        bytes: forward({ kind: 1, data: Buffer.alloc(0), xxh64: 5 }),
        reason: /xxh64 set on a read/,
      },
      {
        what: 'read beyond 32 MiB',
        rpc: 'Forward',
        bytes: forward({ kind: 1, data: Buffer.alloc(0), length: forwardDataBytesMax + 1 }),
        reason: /more than 33554432/,
      },
      {
        what: '65-char volume',
        rpc: 'Describe',
        bytes: messageType('DescribeRequest')
          .encode({ volume: 'v'.repeat(65) })
          .finish(),
        reason: /volume longer than 64 bytes/,
      },
      {
        what: 'no volume',
        rpc: 'Promote',
        bytes: messageType('PromoteRequest').encode({}).finish(),
        reason: /volume missing/,
      },
      {
        what: '65-char node',
        rpc: 'Handover',
        bytes: messageType('HandoverRequest')
          .encode({ volume: 'demo', epoch: 1, toNode: 'n'.repeat(65), fromNode: 'a' })
          .finish(),
        reason: /toNode longer than 64 bytes/,
      },
      {
        what: 'epoch beyond 2^53',
        rpc: 'SyncComplete',
        bytes: messageType('SyncCompleteRequest')
          .encode({ volume: 'demo', epoch: 2 ** 60, fromNode: 'a' })
          .finish(),
        reason: /epoch exceeds 2\^53/,
      },
    ]
    for (const { what, rpc, bytes, reason } of cases) {
      const reply = (await rawCall(address, rpc, bytes)) as {
        error?: { code: string; message: string }
      }
      t.equal(reply.error?.code, 'INVALID_ARGUMENT', `${what}: INVALID_ARGUMENT`)
      t.match(reply.error?.message, reason, `${what}: ${reply.error?.message ?? ''}`)
      t.match(reply.error?.message, new RegExp(`^malformed ${rpc} request: `))
    }
    t.same(node.calls, [], 'no handler was called')

    const valid = (await rawCall(address, 'Forward', forward({}))) as { error?: unknown }
    t.equal(valid.error, undefined, 'the raw client can send a valid forward')
    t.same(
      await client.promote({ volume: 'demo' }),
      { epoch: 8, primary: 'site-b' },
      'still serving',
    )
  },
)

void t.test('the client refuses to send a request it knows is malformed', async (t) => {
  const { node, client } = await startPeer(t)
  await t.rejects(client.describe('v'.repeat(65)), AssertionError)
  await t.rejects(client.forward({ ...forwardBase, length: 4 }), AssertionError)
  await t.rejects(client.forward({ ...forwardBase, kind: 'trim' }), AssertionError)
  await t.rejects(client.handover({ volume: 'v', epoch: -1, toNode: 'b', fromNode: 'a' }))
  t.same(node.calls, [], 'nothing was sent')
})

void t.test('a byte flipped after the checksum: retried, then CHECKSUM_MISMATCH', async (t) => {
  let flips = 0
  let flipsLeft = Infinity
  const { node, client } = await startPeer(t, {
    mutateOutgoing: (request) => {
      if (flipsLeft <= 0 || request.data.length === 0) return
      flipsLeft--
      flips++
      request.data[0] = (request.data[0] ?? 0) ^ 0xff
    },
  })
  const data = Buffer.from('important')
  const error = await failure(client.forward({ ...forwardBase, length: data.length, data }))
  t.equal(error.code, 'CHECKSUM_MISMATCH')
  t.match(error.message, /4 attempts: forwarded write of 9 bytes at 8192 failed its xxh64 check/)
  t.equal(flips, forwardChecksumRetriesMax + 1, 'sent once and retried 3 times')
  t.same(node.calls, [], 'the handler never saw corrupt data')
  t.equal(data.toString(), 'important', "the caller's buffer is untouched")

  flips = 0
  flipsLeft = 2
  await client.forward({ ...forwardBase, length: data.length, data })
  t.equal(flips, 2, 'two corrupt attempts')
  t.equal(node.forwarded().length, 1, 'then one good one reached the handler')
  t.equal(node.forwarded()[0]?.data.toString(), 'important')
})

/** A Peer server that answers every call with `reply(rpc)`, counting calls. */
async function hostilePeer(
  t: Test,
  reply: (rpc: string, calls: number) => Uint8Array,
): Promise<{ client: PeerControlClient; calls: Map<string, number> }> {
  const calls = new Map<string, number>()
  const implementation: grpc.UntypedServiceImplementation = {}
  for (const rpc of Object.keys(peerService)) {
    const handle: grpc.handleUnaryCall<Buffer, Buffer> = (_call, callback) => {
      const count = (calls.get(rpc) ?? 0) + 1
      calls.set(rpc, count)
      callback(null, Buffer.from(reply(rpc, count)))
    }
    implementation[rpc] = handle
  }
  const server = new grpc.Server(peerControlServerOptions)
  server.addService(peerService, implementation)
  const client = new PeerControlClient(await bind(server))
  t.teardown(() => {
    client.close()
    server.forceShutdown()
  })
  return { client, calls }
}

void t.test(
  'hostile replies: bad checksums are retried, malformed ones are IO_ERROR',
  async (t) => {
    const xxh64 = await loadXxh64()
    const ForwardReply = messageType('ForwardReply')
    const good = Buffer.from('0123456789')
    let badSums = Infinity
    let wrongLength = false
    const { client, calls } = await hostilePeer(t, (rpc, count) => {
      switch (rpc) {
        case 'Forward': {
          const data = wrongLength ? good.subarray(1) : good
          const sum = xxh64(data) + (count <= badSums ? 1n : 0n)
          return ForwardReply.encode({ data, xxh64: longBits(sum) }).finish()
        }
        case 'Describe':
          return Buffer.from([0xff, 0xff, 0xff])
        case 'Promote':
          return messageType('PromoteReply')
            .encode({ epoch: 2 ** 60, primary: 'b' })
            .finish()
        case 'Handover':
          return messageType('HandoverReply')
            .encode({ error: { code: 'BOGUS', message: 'm' } })
            .finish()
        default:
          return messageType('SyncCompleteReply')
            .encode({ error: { code: 'EPOCH_STALE_NOT_A_CODE', message: 'x'.repeat(5000) } })
            .finish()
      }
    })
    const read = { ...forwardBase, kind: 'read' as const, length: 10, data: Buffer.alloc(0) }

    const error = await failure(client.forward(read))
    t.equal(error.code, 'CHECKSUM_MISMATCH', 'a read reply that keeps failing its checksum')
    t.match(error.message, /4 attempts: read reply of 10 bytes failed its xxh64 check/)
    t.equal(calls.get('Forward'), forwardChecksumRetriesMax + 1)

    badSums = calls.get('Forward') ?? 0
    badSums += 2
    const recovered = await client.forward(read)
    t.ok(recovered.data.equals(good), 'two bad checksums, then the right bytes')

    badSums = 0
    wrongLength = true
    const short = await failure(client.forward(read))
    t.equal(short.code, 'IO_ERROR')
    t.equal(short.message, 'peer sent a malformed reply: 9 bytes for a read of 10')
    const trim = await failure(client.forward({ ...read, kind: 'trim' }))
    t.equal(trim.message, 'peer sent a malformed reply: data or xxh64 in the reply to a trim')

    const garbage = await failure(client.describe('demo'))
    t.equal(garbage.code, 'IO_ERROR')
    t.match(garbage.message, /^peer sent a malformed reply: not a DescribeReply/)
    const unsafe = await failure(client.promote({ volume: 'demo' }))
    t.equal(unsafe.message, 'peer sent a malformed reply: epoch exceeds 2^53')
    const unknown = await failure(
      client.handover({ volume: 'v', epoch: 1, toNode: 'b', fromNode: 'a' }),
    )
    t.equal(unknown.code, 'IO_ERROR')
    t.equal(unknown.message, 'peer failed with unknown code BOGUS: m')
    const huge = await failure(client.syncComplete({ volume: 'v', epoch: 1, fromNode: 'a' }))
    t.equal(huge.message, 'peer sent a malformed reply: error message longer than 4096 bytes')
  },
)

void t.test(
  'the move calls round-trip, checksum the copied bytes and refuse bad pieces',
  async (t) => {
    const { node, client, address } = await startPeer(t)
    await client.moveBegin({ volume: 'v', fromNode: 'a1', sizeBytes: 2 ** 40 })
    const data = Buffer.from('a moving replica')
    const piece = { volume: 'v', fromNode: 'a1', offset: 2 ** 41, length: data.length, data }
    await client.moveWrite({ ...piece, hole: false })
    await client.moveWrite({ ...piece, data: Buffer.alloc(0), length: 2 ** 30, hole: true })
    const record = {
      volume: 'v',
      fromNode: 'a1',
      epoch: 2 ** 40 + 3,
      primary: 'b1',
      state: 'UpToDate' as const,
      history: [{ generation: 7, owner: 'b1', forced: false }],
    }
    t.same(await client.moveAdopt(record), { bootId: 'boot-1' })
    const step = { volume: 'v', fromNode: 'a1', toNode: 'a2', epoch: 9 }
    t.same(await client.moveCutover(step), { epoch: 10 })
    t.same(await client.moveFinish(step), { bootId: '' })
    t.same(
      node.calls.map((call) => call.rpc),
      ['moveBegin', 'moveWrite', 'moveWrite', 'moveAdopt', 'moveCutover', 'moveFinish'],
    )
    t.same(node.calls[1]?.request, { ...piece, hole: false }, 'the bytes arrive as sent')
    t.same(node.calls[3]?.request, record)

    const refused = [
      { ...piece, length: data.length + 1, hole: false },
      { ...piece, hole: true },
      { ...piece, data: Buffer.alloc(0), length: 0, hole: true },
    ]
    for (const request of refused) {
      await t.rejects(
        client.moveWrite(request),
        AssertionError,
        'the client sends no malformed piece',
      )
    }
    // A piece whose bytes do not match their checksum never reaches the handler.
    const xxh64 = await loadXxh64()
    const bytes = messageType('MoveWriteRequest')
      .encode({ ...piece, offset: 0, xxh64: longBits(xxh64(Buffer.from('something else'))) })
      .finish()
    const reply = (await rawCall(address, 'MoveWrite', bytes, 'MoveWriteReply')) as {
      error?: { code: string; message: string }
    }
    t.equal(reply.error?.code, 'CHECKSUM_MISMATCH')
    t.match(reply.error?.message, /failed its xxh64 check/)
    const hole = messageType('MoveWriteRequest')
      .encode({ ...piece, hole: true, xxh64: longBits(xxh64(data)) })
      .finish()
    const malformed = (await rawCall(address, 'MoveWrite', hole, 'MoveWriteReply')) as {
      error?: { code: string; message: string }
    }
    t.equal(malformed.error?.code, 'INVALID_ARGUMENT', 'a hole with data is refused')
    t.equal(node.calls.length, 6, 'no handler saw the corrupt or malformed pieces')
  },
)

void t.test('a handler that never answers: UNAVAILABLE at the deadline', async (t) => {
  const { node, client } = await startPeer(t)
  let release = (): void => undefined
  node.hang = new Promise((resolve) => {
    release = resolve
  })
  t.teardown(() => {
    release()
  })
  const start = Date.now()
  const error = await failure(client.describe('demo', 300))
  const elapsedMs = Date.now() - start
  t.equal(error.code, 'UNAVAILABLE')
  t.match(error.message, /unreachable: DEADLINE_EXCEEDED/)
  t.ok(elapsedMs >= 250 && elapsedMs < 2000, `failed after ${elapsedMs} ms`)
})

void t.test('a stopped server: UNAVAILABLE within the deadline, and after close()', async (t) => {
  const { client, server, address } = await startPeer(t, { deadlineMs: 3000 })
  t.same(await client.promote({ volume: 'demo' }), { epoch: 8, primary: 'site-b' }, 'connected')
  server.forceShutdown()
  for (let i = 0; i < 3; i++) {
    const start = Date.now()
    const error = await failure(client.describe('demo'))
    const elapsedMs = Date.now() - start
    t.equal(error.code, 'UNAVAILABLE', `call ${i}`)
    t.match(error.message, new RegExp(`^peer ${address} unreachable: `))
    t.ok(elapsedMs < 3000, `call ${i} failed after ${elapsedMs} ms`)
  }
  const never = new PeerControlClient(address, { deadlineMs: 3000 })
  t.teardown(() => {
    never.close()
  })
  const refused = await failure(never.forward(forwardBase))
  t.equal(refused.code, 'UNAVAILABLE', 'a peer that was never up')

  client.close()
  const closed = await failure(client.describe('demo'))
  t.equal(closed.code, 'SHUTTING_DOWN')
})
