/**
 * Proves the NBD codec edge: encoders write the bytes doc/proto.md specifies, decoders read them
 * back and never throw or read past the end on any input, and `validateRequest` answers every
 * command with the errno nbdkit would (EINVAL, ENOSPC, EPERM) and, whatever the header, only ever
 * accepts requests that lie inside the export with allowed flags and safe-integer offsets.
 */
import t from 'tap'
import {
  Cmd,
  CmdFlag,
  Errno,
  IHAVEOPT,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  PAYLOAD_BYTES_MAX,
  REQUEST_MAGIC,
  ReplyFlag,
  ReplyType,
  STRUCTURED_REPLY_MAGIC,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  decodeRequestHeader,
  encodeBlockStatusChunk,
  encodeDataChunkHeader,
  encodeDoneChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeHoleChunk,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOptionReply,
  encodeRequestHeader,
  encodeServerGreeting,
  encodeSimpleReply,
  validateRequest,
} from '../../src/nbd/protocol.js'
import type { RequestHeader, TransmissionContext } from '../../src/nbd/protocol.js'
import { Prng, testSeed } from '../lib/prng.js'
import { infoRequest, metaContextRequest } from '../lib/nbd-client.js'

const MiB = 1024 * 1024
const SIZE = 64 * MiB

const ctx: TransmissionContext = {
  sizeBytes: SIZE,
  readOnly: false,
  structuredReplies: true,
  baseAllocation: true,
  minBlockBytes: 1,
}

function req(partial: Partial<RequestHeader> & { type: number }): RequestHeader {
  return { magic: REQUEST_MAGIC, flags: 0, cookie: 7n, offset: 0n, length: 4096, ...partial }
}

function errnoOf(header: RequestHeader, context: TransmissionContext = ctx): number {
  const v = validateRequest(header, context)
  return v.ok ? 0 : v.errno
}

void t.test('encoders write the bytes the spec lays out', (t) => {
  const greeting = encodeServerGreeting()
  t.equal(greeting.length, 18)
  t.equal(greeting.readBigUInt64BE(0), NBDMAGIC)
  t.equal(greeting.readBigUInt64BE(8), IHAVEOPT)
  t.equal(greeting.readUInt16BE(16), 3, 'FIXED_NEWSTYLE | NO_ZEROES')

  const reply = encodeOptionReply(7, 0x80000003, Buffer.from('why'))
  t.same(
    reply,
    Buffer.concat([
      Buffer.from('0003e889045565a9', 'hex'),
      Buffer.from('00000007' + '80000003' + '00000003', 'hex'),
      Buffer.from('why'),
    ]),
  )
  t.equal(reply.readBigUInt64BE(0), OPTION_REPLY_MAGIC)

  t.same(
    encodeInfoExport(2 ** 40, 0x1234),
    Buffer.from('0000' + '0000010000000000' + '1234', 'hex'),
  )
  t.same(
    encodeInfoBlockSize(1, 4096, 32 * MiB),
    Buffer.from('0003' + '00000001' + '00001000' + '02000000', 'hex'),
  )
  t.equal(encodeExportNameReply(512, 1, true).length, 10)
  const zeroes = encodeExportNameReply(512, 1, false)
  t.equal(zeroes.length, 134)
  t.ok(
    zeroes.subarray(10).every((b) => b === 0),
    '124 trailing zeroes',
  )

  t.same(
    encodeSimpleReply(0xdeadbeefn, 22),
    Buffer.from('67446698' + '00000016' + '00000000deadbeef', 'hex'),
  )
  t.same(
    encodeDataChunkHeader(5n, 4096, 512, true),
    Buffer.from(
      '668e33ef' + '0001' + '0001' + '0000000000000005' + '00000208' + '0000000000001000',
      'hex',
    ),
  )
  t.same(
    encodeHoleChunk(5n, 0, 4096, false),
    Buffer.from(
      '668e33ef' +
        '0000' +
        '0002' +
        '0000000000000005' +
        '0000000c' +
        '0000000000000000' +
        '00001000',
      'hex',
    ),
  )
  t.same(
    encodeDoneChunk(9n),
    Buffer.from('668e33ef' + '0001' + '0000' + '0000000000000009' + '00000000', 'hex'),
  )
  const error = encodeErrorChunk(9n, Errno.ENOSPC, 'full')
  t.equal(error.readUInt32BE(0), STRUCTURED_REPLY_MAGIC)
  t.equal(error.readUInt16BE(4), ReplyFlag.DONE)
  t.equal(error.readUInt16BE(6), ReplyType.ERROR)
  t.equal(error.readUInt32BE(16), 6 + 4, 'length covers errno, message length and message')
  t.equal(error.readUInt32BE(20), 28)
  t.equal(error.readUInt16BE(24), 4)
  t.equal(error.subarray(26).toString(), 'full')
  const long = encodeErrorChunk(1n, Errno.EIO, 'x'.repeat(10_000))
  t.equal(long.readUInt16BE(24), 4096, 'messages are capped at the 4096-byte string limit')
  t.equal(long.length, 26 + 4096)

  const status = encodeBlockStatusChunk(3n, 1, [
    { length: 65536, flags: 3 },
    { length: 512, flags: 0 },
  ])
  t.equal(status.readUInt16BE(6), ReplyType.BLOCK_STATUS)
  t.equal(status.readUInt32BE(16), 4 + 16)
  t.same(
    status.subarray(20),
    Buffer.from('00000001' + '00010000' + '00000003' + '00000200' + '00000000', 'hex'),
  )
  t.end()
})

void t.test('request and option headers round-trip, including 64-bit offsets', (t) => {
  for (const offset of [0n, 1n, 2n ** 53n + 1n, 2n ** 64n - 1n]) {
    const header = {
      flags: 0xffff,
      type: 0xffff,
      cookie: 2n ** 64n - 2n,
      offset,
      length: 0xffffffff,
    }
    const encoded = encodeRequestHeader(header)
    t.equal(encoded.length, 28)
    t.same(decodeRequestHeader(encoded), { magic: REQUEST_MAGIC, ...header })
    t.same(decodeRequestHeader(Buffer.concat([Buffer.alloc(3), encoded]), 3), {
      magic: REQUEST_MAGIC,
      ...header,
    })
  }
  const option = Buffer.from('49484156454f5054' + '00000007' + '00010001', 'hex')
  t.same(decodeOptionHeader(option), { magic: IHAVEOPT, option: 7, length: 65537 })
  t.end()
})

void t.test('info and meta-context requests decode what the client helpers encode', (t) => {
  t.same(decodeInfoRequest(infoRequest('vol', [1, 3])), {
    ok: true,
    value: { name: 'vol', infos: [1, 3] },
  })
  t.same(decodeInfoRequest(infoRequest('')), { ok: true, value: { name: '', infos: [] } })
  t.same(decodeMetaContextRequest(metaContextRequest('vol', ['base:allocation', 'x-a:b'])), {
    ok: true,
    value: { name: 'vol', queries: ['base:allocation', 'x-a:b'] },
  })
  t.same(decodeMetaContextRequest(metaContextRequest('', [])), {
    ok: true,
    value: { name: '', queries: [] },
  })
  t.end()
})

void t.test('malformed info and meta-context requests are refused with a reason', (t) => {
  const good = infoRequest('vol', [1])
  for (const bad of [
    Buffer.alloc(0),
    good.subarray(0, 3),
    good.subarray(0, good.length - 1),
    Buffer.concat([good, Buffer.alloc(1)]),
    Buffer.from('ffffffff', 'hex'),
    infoRequest('x'.repeat(4097)),
  ]) {
    const decoded = decodeInfoRequest(bad)
    t.equal(decoded.ok, false, bad.toString('hex').slice(0, 40))
  }
  const meta = metaContextRequest('vol', ['base:allocation'])
  for (const bad of [
    Buffer.alloc(0),
    meta.subarray(0, meta.length - 1),
    Buffer.concat([meta, Buffer.alloc(1)]),
    metaContextRequest('vol', ['x'.repeat(4097)]),
    Buffer.from('00000000' + 'ffffffff', 'hex'),
  ]) {
    t.equal(decodeMetaContextRequest(bad).ok, false, bad.toString('hex').slice(0, 40))
  }
  t.end()
})

void t.test('decoders never throw on random or truncated buffers', (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (replay with DUPLEX_SEED=${seed})`)
  const rng = new Prng(seed)
  const samples = [
    infoRequest('vol', [0, 1, 2, 3]),
    metaContextRequest('vol', ['base:', 'base:allocation']),
  ]
  let failures = 0
  for (let i = 0; i < 5000; i++) {
    let buf: Buffer
    const source = samples[rng.int(samples.length)] ?? Buffer.alloc(0)
    if (rng.bool()) {
      buf = Buffer.from(source.subarray(0, rng.int(source.length + 1)))
      if (buf.length > 0 && rng.bool()) buf[rng.int(buf.length)] = rng.int(256)
    } else {
      buf = Buffer.alloc(rng.int(64))
      for (let j = 0; j < buf.length; j++) buf[j] = rng.bool(0.7) ? 0 : rng.int(256)
    }
    // A view into a larger buffer whose tail is poison: reading past the end would see it.
    const backing = Buffer.concat([buf, Buffer.from('00000001ffff', 'hex')])
    const view = backing.subarray(0, buf.length)
    try {
      // Decoded strings are re-measured in bytes; invalid UTF-8 (U+FFFD) does not round-trip.
      const bytes = (text: string): number =>
        text.includes('\ufffd') ? NaN : Buffer.byteLength(text)
      const info = decodeInfoRequest(view)
      if (info.ok && 6 + bytes(info.value.name) + 2 * info.value.infos.length > buf.length) {
        failures++
        t.comment(`info consumed more than ${buf.length}: ${buf.toString('hex')}`)
      }
      const meta = decodeMetaContextRequest(view)
      if (meta.ok) {
        const used = meta.value.queries.reduce(
          (n, q) => n + 4 + bytes(q),
          8 + bytes(meta.value.name),
        )
        if (used > buf.length || (used !== buf.length && !Number.isNaN(used))) {
          failures++
          t.comment(`meta used ${used} of ${buf.length}: ${buf.toString('hex')}`)
        }
      }
    } catch {
      failures++
    }
  }
  t.equal(failures, 0, `seed ${seed}`)
  t.end()
})

void t.test('validateRequest: unknown commands and flags are EINVAL', (t) => {
  for (const type of [8, 9, 0x7fff, 0xffff])
    t.equal(errnoOf(req({ type })), Errno.EINVAL, `type ${type}`)
  const cases: [number, number][] = [
    [Cmd.READ, CmdFlag.NO_HOLE],
    [Cmd.READ, CmdFlag.REQ_ONE],
    [Cmd.WRITE, CmdFlag.DF],
    [Cmd.WRITE, CmdFlag.NO_HOLE],
    [Cmd.TRIM, CmdFlag.FAST_ZERO],
    [Cmd.WRITE_ZEROES, CmdFlag.DF],
    [Cmd.BLOCK_STATUS, CmdFlag.DF],
    [Cmd.CACHE, CmdFlag.REQ_ONE],
    [Cmd.FLUSH, CmdFlag.NO_HOLE],
    [Cmd.READ, 1 << 5],
    [Cmd.WRITE, 0x8000],
  ]
  for (const [type, flags] of cases) {
    t.equal(
      errnoOf(req({ type, flags })),
      Errno.EINVAL,
      `type ${type} flags 0x${flags.toString(16)}`,
    )
  }
  t.end()
})

void t.test('validateRequest: FUA is accepted on every command (the spec says MUST)', (t) => {
  for (const type of [
    Cmd.READ,
    Cmd.WRITE,
    Cmd.TRIM,
    Cmd.CACHE,
    Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS,
  ]) {
    t.equal(errnoOf(req({ type, flags: CmdFlag.FUA })), 0, `type ${type}`)
  }
  t.equal(errnoOf(req({ type: Cmd.FLUSH, flags: CmdFlag.FUA, length: 0 })), 0, 'flush')
  t.end()
})

void t.test('validateRequest: each command and its flags map to the command', (t) => {
  t.same(validateRequest(req({ type: Cmd.READ, flags: CmdFlag.DF, offset: 512n }), ctx), {
    ok: true,
    command: { kind: 'read', offset: 512, length: 4096, df: true },
  })
  t.same(validateRequest(req({ type: Cmd.WRITE, flags: CmdFlag.FUA }), ctx), {
    ok: true,
    command: { kind: 'write', offset: 0, length: 4096, fua: true },
  })
  t.same(validateRequest(req({ type: Cmd.TRIM }), ctx), {
    ok: true,
    command: { kind: 'trim', offset: 0, length: 4096, fua: false },
  })
  t.same(
    validateRequest(
      req({
        type: Cmd.WRITE_ZEROES,
        flags: CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
        length: 64 * MiB,
      }),
      ctx,
    ),
    {
      ok: true,
      command: {
        kind: 'zero',
        offset: 0,
        length: 64 * MiB,
        fua: false,
        noHole: true,
        fastZero: true,
      },
    },
  )
  t.same(validateRequest(req({ type: Cmd.CACHE }), ctx), {
    ok: true,
    command: { kind: 'cache', offset: 0, length: 4096 },
  })
  t.same(validateRequest(req({ type: Cmd.BLOCK_STATUS, flags: CmdFlag.REQ_ONE }), ctx), {
    ok: true,
    command: { kind: 'blockStatus', offset: 0, length: 4096, reqOne: true },
  })
  t.same(validateRequest(req({ type: Cmd.FLUSH, length: 0 }), ctx), {
    ok: true,
    command: { kind: 'flush' },
  })
  t.same(validateRequest(req({ type: Cmd.DISC, length: 0 }), ctx), {
    ok: true,
    command: { kind: 'disconnect' },
  })
  t.end()
})

void t.test('validateRequest: negotiation gates DF and BLOCK_STATUS', (t) => {
  const simple = { ...ctx, structuredReplies: false, baseAllocation: false }
  t.equal(
    errnoOf(req({ type: Cmd.READ, flags: CmdFlag.DF }), simple),
    Errno.EINVAL,
    'DF without structured replies',
  )
  t.equal(errnoOf(req({ type: Cmd.READ }), simple), 0)
  t.equal(errnoOf(req({ type: Cmd.BLOCK_STATUS }), { ...ctx, baseAllocation: false }), Errno.EINVAL)
  t.equal(errnoOf(req({ type: Cmd.BLOCK_STATUS }), simple), Errno.EINVAL)
  t.end()
})

void t.test('validateRequest: zero length, oversized reads and flush with data are EINVAL', (t) => {
  for (const type of [
    Cmd.READ,
    Cmd.WRITE,
    Cmd.TRIM,
    Cmd.CACHE,
    Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS,
  ]) {
    t.equal(errnoOf(req({ type, length: 0 })), Errno.EINVAL, `zero-length type ${type}`)
  }
  const big = { ...ctx, sizeBytes: 1024 * MiB }
  t.equal(
    errnoOf(req({ type: Cmd.READ, length: PAYLOAD_BYTES_MAX }), big),
    0,
    'exactly 32 MiB is fine',
  )
  t.equal(errnoOf(req({ type: Cmd.READ, length: PAYLOAD_BYTES_MAX + 1 }), big), Errno.EINVAL)
  t.equal(errnoOf(req({ type: Cmd.READ, length: 33 * MiB }), big), Errno.EINVAL)
  t.equal(errnoOf(req({ type: Cmd.WRITE, length: PAYLOAD_BYTES_MAX + 1 }), big), Errno.EINVAL)
  t.equal(errnoOf(req({ type: Cmd.WRITE, length: 0xffffffff }), big), Errno.EINVAL)
  t.equal(
    errnoOf(req({ type: Cmd.WRITE_ZEROES, length: 128 * MiB }), big),
    0,
    'zeroing is not a payload',
  )
  t.equal(errnoOf(req({ type: Cmd.TRIM, length: 128 * MiB }), big), 0)
  t.equal(errnoOf(req({ type: Cmd.FLUSH, offset: 1n, length: 0 })), Errno.EINVAL)
  t.equal(errnoOf(req({ type: Cmd.FLUSH, offset: 0n, length: 1 })), Errno.EINVAL)
  t.end()
})

void t.test('validateRequest: out of range is EINVAL, except writes which get ENOSPC', (t) => {
  const end = BigInt(SIZE)
  for (const [offset, length] of [
    [end, 1],
    [end - 1n, 2],
    [end + 4096n, 4096],
  ] as const) {
    t.equal(
      errnoOf(req({ type: Cmd.READ, offset, length })),
      Errno.EINVAL,
      `read ${offset}+${length}`,
    )
    t.equal(errnoOf(req({ type: Cmd.TRIM, offset, length })), Errno.EINVAL)
    t.equal(errnoOf(req({ type: Cmd.CACHE, offset, length })), Errno.EINVAL)
    t.equal(errnoOf(req({ type: Cmd.BLOCK_STATUS, offset, length })), Errno.EINVAL)
    t.equal(errnoOf(req({ type: Cmd.WRITE, offset, length })), Errno.ENOSPC)
    t.equal(errnoOf(req({ type: Cmd.WRITE_ZEROES, offset, length })), Errno.ENOSPC)
  }
  t.equal(
    errnoOf(req({ type: Cmd.READ, offset: end - 1n, length: 1 })),
    0,
    'the last byte is readable',
  )
  t.equal(errnoOf(req({ type: Cmd.WRITE, offset: end - 4096n, length: 4096 })), 0)
  t.end()
})

void t.test('validateRequest: offsets near 2^64 do not wrap around', (t) => {
  const top = 2n ** 64n
  for (const [offset, length] of [
    [top - 1n, 1],
    [top - 4096n, 4096],
    [top - 1n, 0xffffffff],
    [top - 2n ** 32n + 1n, 0xffffffff],
    [2n ** 53n, 4096],
  ] as const) {
    t.equal(errnoOf(req({ type: Cmd.READ, offset, length })), Errno.EINVAL, `read at ${offset}`)
    t.equal(errnoOf(req({ type: Cmd.WRITE, offset, length: Math.min(length, 4096) })), Errno.ENOSPC)
    t.equal(errnoOf(req({ type: Cmd.WRITE_ZEROES, offset, length })), Errno.ENOSPC)
  }
  t.end()
})

void t.test(
  'validateRequest: read-only exports refuse writes, trims and zeroes with EPERM',
  (t) => {
    const ro = { ...ctx, readOnly: true }
    for (const type of [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
      t.equal(errnoOf(req({ type }), ro), Errno.EPERM)
    for (const type of [Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS])
      t.equal(errnoOf(req({ type }), ro), 0)
    t.equal(errnoOf(req({ type: Cmd.FLUSH, length: 0 }), ro), 0)
    t.end()
  },
)

void t.test('validateRequest: misaligned requests are EINVAL when minBlockBytes is 512', (t) => {
  const aligned = { ...ctx, minBlockBytes: 512 }
  for (const type of [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]) {
    t.equal(errnoOf(req({ type, offset: 512n, length: 1024 }), aligned), 0, `type ${type} aligned`)
    t.equal(
      errnoOf(req({ type, offset: 1n, length: 512 }), aligned),
      Errno.EINVAL,
      `type ${type} offset`,
    )
    t.equal(
      errnoOf(req({ type, offset: 0n, length: 100 }), aligned),
      Errno.EINVAL,
      `type ${type} length`,
    )
  }
  t.equal(
    errnoOf(req({ type: Cmd.BLOCK_STATUS, offset: 1n, length: 100 }), aligned),
    0,
    'block status is a query',
  )
  t.equal(errnoOf(req({ type: Cmd.CACHE, offset: 1n, length: 100 }), aligned), 0, 'cache is a hint')
  t.end()
})

void t.test('validateRequest never throws and only accepts requests inside the export', (t) => {
  const seed = testSeed()
  t.comment(`seed ${seed} (replay with DUPLEX_SEED=${seed})`)
  const rng = new Prng(seed)
  const allowedFlags: Record<string, number> = {
    read: CmdFlag.DF | CmdFlag.FUA,
    write: CmdFlag.FUA,
    trim: CmdFlag.FUA,
    zero: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    cache: CmdFlag.FUA,
    blockStatus: CmdFlag.REQ_ONE | CmdFlag.FUA,
  }
  const u64 = (): bigint => (BigInt(rng.int(2 ** 32)) << 32n) | BigInt(rng.int(2 ** 32))
  const near = (x: bigint): bigint => {
    const v = x + BigInt(rng.int(2 * 65536)) - 65536n
    return v < 0n ? 0n : v >= 2n ** 64n ? 2n ** 64n - 1n : v
  }
  let accepted = 0
  let problems = 0
  for (let i = 0; i < 20_000; i++) {
    const context: TransmissionContext = {
      sizeBytes: [0, 1, 512, SIZE, 2 ** 53 - 1, rng.int(2 ** 40)][rng.int(6)] ?? 0,
      readOnly: rng.bool(0.2),
      structuredReplies: rng.bool(),
      baseAllocation: rng.bool(),
      minBlockBytes: rng.bool() ? 1 : 512,
    }
    const size = BigInt(context.sizeBytes)
    const offset = [0n, u64(), near(size), near(2n ** 64n), BigInt(rng.int(SIZE))][rng.int(5)] ?? 0n
    const length =
      [0, rng.int(2 ** 32), rng.int(65536), PAYLOAD_BYTES_MAX + rng.int(3) - 1][rng.int(4)] ?? 0
    const header: RequestHeader = {
      magic: REQUEST_MAGIC,
      flags: rng.bool() ? 0 : rng.bool() ? 1 << rng.int(16) : rng.int(65536),
      type: rng.bool(0.9) ? rng.int(9) : rng.int(65536),
      cookie: u64(),
      offset,
      length,
    }
    let v
    try {
      v = validateRequest(header, context)
    } catch (error) {
      problems++
      t.fail(
        `threw on ${JSON.stringify(header, (_, x: unknown) => (typeof x === 'bigint' ? String(x) : x))}: ${String(error)}`,
      )
      continue
    }
    if (!v.ok) {
      if (![Errno.EINVAL, Errno.ENOSPC, Errno.EPERM].includes(v.errno as 22 | 28 | 1)) problems++
      continue
    }
    accepted++
    const c = v.command
    if (c.kind === 'flush' || c.kind === 'disconnect') continue
    const ok =
      Number.isSafeInteger(c.offset) &&
      Number.isSafeInteger(c.length) &&
      c.length > 0 &&
      BigInt(c.offset) === header.offset &&
      c.length === header.length &&
      c.offset + c.length <= context.sizeBytes &&
      (header.flags & ~(allowedFlags[c.kind] ?? 0)) === 0 &&
      !(context.readOnly && (c.kind === 'write' || c.kind === 'trim' || c.kind === 'zero')) &&
      !((c.kind === 'read' || c.kind === 'write') && c.length > PAYLOAD_BYTES_MAX) &&
      !(c.kind === 'blockStatus' && !context.baseAllocation) &&
      !(c.kind === 'read' && c.df && !context.structuredReplies)
    if (!ok) problems++
  }
  t.equal(problems, 0, `seed ${seed}`)
  t.ok(accepted > 500, `the generator reaches the accepting paths (${accepted} accepted)`)
  t.end()
})
