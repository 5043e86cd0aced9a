/**
 * The replication codec (src/replica/peer-messages.ts): round trips of every message, and the
 * edge contract: hostile or garbage bytes come back as a typed DecodeError, never a throw.
 */
import t from 'tap'
import protobuf from 'protobufjs'
import {
  decodeRequest,
  decodeResponse,
  encodeRequest,
  encodeResponse,
  replicationProtoPath,
} from '../../src/replica/peer-messages.js'
import type {
  DecodeErrorCode,
  Decoded,
  ReplicateRequest,
  ReplicateResponse,
  WireOp,
} from '../../src/replica/peer-messages.js'
import { Prng, testSeed } from '../lib/prng.js'

const root = protobuf.loadSync(replicationProtoPath)
const RequestType = root.lookupType('duplex.v1.ReplicateRequest')

function value<T>(decoded: Decoded<T>): T {
  if (!decoded.ok) throw decoded.error
  return decoded.value
}

function errorCode(decoded: Decoded<unknown>): DecodeErrorCode | 'ok' {
  return decoded.ok ? 'ok' : decoded.error.code
}

function write(seq: number, data: Buffer, offset = 4096 * seq): WireOp {
  const op = { epoch: 3, seq, kind: 'write' as const, offset, length: data.length, data }
  return { ...op, xxh64: 0xfedcba9876543210n, fua: seq % 2 === 0, noHole: false }
}

const requests: ReplicateRequest[] = [
  {
    type: 'hello',
    hello: {
      volume: 'demo',
      epoch: 7,
      fromNode: 'site-a',
      incarnation: Buffer.from('0123456789abcdef'),
      protocolVersion: 1,
    },
  },
  {
    type: 'ops',
    ops: [
      write(1, Buffer.alloc(4096, 7)),
      { ...write(2, Buffer.alloc(0)), kind: 'trim', length: 1 << 20, xxh64: 0n },
      { ...write(3, Buffer.alloc(0), 2 ** 52), kind: 'zero', length: 512, xxh64: 0n, noHole: true },
    ],
  },
  { type: 'flush', epoch: 7, flushId: 2 ** 53 - 1 },
  { type: 'goodbye', reason: 'RESET', message: 'checksum retries exhausted' },
]

const responses: ReplicateResponse[] = [
  { type: 'helloAck', helloAck: { incarnation: Buffer.from([1, 2, 3]), epoch: 7, appliedSeq: 0 } },
  { type: 'helloReject', helloReject: { code: 'EPOCH_STALE', message: 'old', epoch: 9 } },
  {
    type: 'acks',
    acks: [
      { epoch: 7, seq: 1 },
      { epoch: 7, seq: 2 ** 40 },
    ],
  },
  { type: 'flushAck', epoch: 7, flushId: 3 },
  { type: 'reject', epoch: 7, seq: 4, code: 'CHECKSUM_MISMATCH', message: 'bad xxh64' },
  { type: 'rejectFlush', epoch: 7, flushId: 5, code: 'IO_ERROR', message: 'EIO' },
  { type: 'goodbye', reason: 'SHUTTING_DOWN', message: 'bye' },
]

void t.test('round trip: every request and response', (t) => {
  for (const request of requests) {
    t.same(value(decodeRequest(encodeRequest(request))), request, request.type)
  }
  for (const response of responses) {
    t.same(value(decodeResponse(encodeResponse(response))), response, response.type)
  }
  t.end()
})

void t.test('hostile fields become typed errors', (t) => {
  const op = (fields: Record<string, unknown>): Uint8Array => {
    const base = { epoch: 1, seq: 1, kind: 1, offset: 0, length: 3, data: Buffer.from('abc') }
    return RequestType.encode({ ops: { ops: [{ ...base, ...fields }] } }).finish()
  }
  t.equal(errorCode(decodeRequest(op({}))), 'ok', 'the base op is valid')
  t.equal(errorCode(decodeRequest(op({ kind: 9 }))), 'UNKNOWN_ENUM')
  t.equal(errorCode(decodeRequest(op({ kind: 0 }))), 'MISSING_FIELD')
  t.equal(errorCode(decodeRequest(op({ seq: 0 }))), 'MISSING_FIELD')
  t.equal(errorCode(decodeRequest(op({ length: 4 }))), 'LENGTH_MISMATCH')
  t.equal(errorCode(decodeRequest(op({ kind: 2, length: 3 }))), 'LENGTH_MISMATCH', 'trim + data')
  t.equal(errorCode(decodeRequest(op({ offset: '9007199254740992' }))), 'UNSAFE_INTEGER')
  t.equal(errorCode(decodeRequest(op({ offset: 2 ** 53 - 2 }))), 'UNSAFE_INTEGER', 'end > 2^53')
  t.equal(errorCode(decodeRequest(op({ epoch: '18446744073709551615' }))), 'UNSAFE_INTEGER')
  t.equal(errorCode(decodeRequest(RequestType.encode({}).finish())), 'MALFORMED', 'no body')
  t.equal(errorCode(decodeRequest(RequestType.encode({ ops: {} }).finish())), 'MISSING_FIELD')
  const hello = RequestType.encode({ hello: { volume: 'v', fromNode: 'a', protocolVersion: 1 } })
  t.equal(errorCode(decodeRequest(hello.finish())), 'MISSING_FIELD', 'no incarnation')
  const longName = RequestType.encode({
    hello: { volume: 'v'.repeat(5000), fromNode: 'a', incarnation: [1], protocolVersion: 1 },
  })
  t.equal(errorCode(decodeRequest(longName.finish())), 'TOO_LARGE')
  t.equal(errorCode(decodeRequest(Buffer.from([0x0a, 0x80]))), 'MALFORMED', 'truncated')
  t.equal(errorCode(decodeResponse(Buffer.from([0xff, 0xff, 0xff]))), 'MALFORMED')
  const reject = encodeResponse(responses[4] as ReplicateResponse)
  t.equal(errorCode(decodeRequest(reject)), 'MALFORMED', 'a response is not a request')
  t.end()
})

void t.test('property: random and mutated buffers never throw', (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (DUPLEX_SEED=${seed} replays)`)
  const prng = new Prng(seed)
  const valid = [...requests.map(encodeRequest), ...responses.map(encodeResponse)]
  const counts = new Map<string, number>()
  for (let run = 0; run < 20000; run++) {
    let bytes: Buffer
    if (prng.bool(0.3)) {
      bytes = Buffer.alloc(prng.int(64))
      for (let i = 0; i < bytes.length; i++) bytes[i] = prng.int(256)
    } else {
      bytes = Buffer.from(valid[prng.int(valid.length)] ?? Buffer.alloc(0))
      const flips = 1 + prng.int(4)
      for (let i = 0; i < flips && bytes.length > 0; i++)
        bytes[prng.int(bytes.length)] = prng.int(256)
      if (prng.bool(0.2)) bytes = bytes.subarray(0, prng.int(bytes.length + 1))
    }
    for (const decoded of [decodeRequest(bytes), decodeResponse(bytes)]) {
      const code = errorCode(decoded)
      counts.set(code, (counts.get(code) ?? 0) + 1)
      if (decoded.ok) continue
      if (!(decoded.error instanceof Error) || decoded.error.message === '') {
        t.fail(`untyped error for ${bytes.toString('hex')}`)
      }
    }
  }
  t.comment(JSON.stringify(Object.fromEntries(counts)))
  t.ok((counts.get('MALFORMED') ?? 0) > 0, 'garbage was seen')
  t.end()
})

void t.test('property: random valid op batches round trip', (t) => {
  const differing: number[] = []
  const prng = new Prng(testSeed())
  for (let run = 0; run < 200; run++) {
    const ops: WireOp[] = []
    const count = 1 + prng.int(40)
    for (let i = 0; i < count; i++) {
      const kind = (['write', 'trim', 'zero'] as const)[prng.int(3)] ?? 'write'
      const length = prng.int(9000)
      const data = kind === 'write' ? Buffer.alloc(length, prng.int(256)) : Buffer.alloc(0)
      ops.push({
        epoch: prng.int(2 ** 31),
        seq: 1 + prng.int(2 ** 31),
        kind,
        offset: prng.int(2 ** 31) * 512,
        length,
        data,
        xxh64: kind === 'write' ? BigInt(prng.int(2 ** 31)) << BigInt(prng.int(33)) : 0n,
        fua: prng.bool(),
        noHole: prng.bool(),
      })
    }
    const request: ReplicateRequest = { type: 'ops', ops }
    const decoded = value(decodeRequest(encodeRequest(request)))
    if (JSON.stringify(decoded, replacer) !== JSON.stringify(request, replacer)) {
      differing.push(run)
    }
  }
  t.same(differing, [], 'all 200 batches round-trip exactly')
  t.end()
})

function replacer(_key: string, v: unknown): unknown {
  if (typeof v === 'bigint') return v.toString()
  if (Buffer.isBuffer(v)) return v.toString('hex')
  return v
}
