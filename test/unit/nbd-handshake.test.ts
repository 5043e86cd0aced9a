/**
 * Proves the pure option-haggling state machine answers each option as doc/proto.md asks, read as
 * transcripts: `C:` is what the client sends, `S:` the replies the Handshake returns (option, reply
 * type, decoded payload) and where the connection goes next (continue, close, transmission).
 */
import t from 'tap'
import { Handshake } from '../../src/nbd/handshake.js'
import type { ExportLookup, Step } from '../../src/nbd/handshake.js'
import type { ExportInfo } from '../../src/nbd/exports.js'
import {
  BASE_ALLOCATION_ID,
  ClientFlag,
  Info,
  OPTION_REPLY_MAGIC,
  Opt,
  Rep,
  TransmissionFlag,
} from '../../src/nbd/protocol.js'
import { infoRequest, metaContextRequest, u32 } from '../lib/nbd-client.js'

const vol: ExportInfo = {
  name: 'vol',
  description: 'the test volume',
  sizeBytes: 1 << 20,
  readOnly: false,
}
const ro: ExportInfo = { name: 'ro', description: '', sizeBytes: 4096, readOnly: true }

function lookup(exports: ExportInfo[]): ExportLookup {
  return { list: () => exports, find: (name) => exports.find((e) => e.name === name) }
}

const blockSizes = { minBytes: 1, preferredBytes: 4096, maxBytes: 32 << 20 }
const FIXED = ClientFlag.FIXED_NEWSTYLE
const BOTH = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES

function started(exports: ExportInfo[] = [vol, ro], flags = BOTH): Handshake {
  const h = new Handshake(lookup(exports), blockSizes)
  const next = h.start(flags)
  if (next.kind !== 'continue') throw new Error('start refused')
  return h
}

const repName = Object.fromEntries(Object.entries(Rep).map(([k, v]) => [v, k]))

/** One reply as a transcript line: `ACK`, `INFO EXPORT size=… flags=…`, `ERR_INVALID "why"`, … */
function line(buf: Buffer, option: number): string {
  if (buf.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) return `raw ${buf.toString('hex')}`
  if (buf.readUInt32BE(8) !== option) return `wrong option ${buf.readUInt32BE(8)}`
  const type = buf.readUInt32BE(12)
  const data = buf.subarray(20)
  if (buf.readUInt32BE(16) !== data.length) return 'bad length'
  const name = repName[type] ?? `0x${type.toString(16)}`
  switch (type) {
    case Rep.ACK:
      return data.length === 0 ? 'ACK' : 'ACK with data'
    case Rep.SERVER:
      return `SERVER ${data.subarray(4, 4 + data.readUInt32BE(0)).toString()}`
    case Rep.META_CONTEXT:
      return `META_CONTEXT id=${data.readUInt32BE(0)} ${data.subarray(4).toString()}`
    case Rep.INFO: {
      const info = data.readUInt16BE(0)
      if (info === Info.EXPORT)
        return `INFO EXPORT size=${data.readBigUInt64BE(2)} flags=0x${data.readUInt16BE(10).toString(16)}`
      if (info === Info.BLOCK_SIZE) {
        return `INFO BLOCK_SIZE ${data.readUInt32BE(2)} ${data.readUInt32BE(6)} ${data.readUInt32BE(10)}`
      }
      if (info === Info.NAME) return `INFO NAME ${data.subarray(2).toString()}`
      if (info === Info.DESCRIPTION) return `INFO DESCRIPTION ${data.subarray(2).toString()}`
      return `INFO ${info}`
    }
    default:
      return type >= 0x80000000 ? `${name}${data.length > 0 ? ' (message)' : ''}` : name
  }
}

function transcript(step: Step, option: number): string[] {
  const next =
    step.next.kind === 'transmission'
      ? `-> transmission ${JSON.stringify(step.next.start)}`
      : `-> ${step.next.kind}`
  return [...step.replies.map((r) => line(r, option)), next]
}

const FLAGS_RW =
  TransmissionFlag.HAS_FLAGS |
  TransmissionFlag.SEND_FLUSH |
  TransmissionFlag.SEND_FUA |
  TransmissionFlag.SEND_TRIM |
  TransmissionFlag.SEND_WRITE_ZEROES |
  TransmissionFlag.CAN_MULTI_CONN |
  TransmissionFlag.SEND_CACHE |
  TransmissionFlag.SEND_FAST_ZERO
const hex = (n: number): string => `0x${n.toString(16)}`

void t.test('client flags: known bits continue, unknown bits or no FIXED_NEWSTYLE close', (t) => {
  const h = (): Handshake => new Handshake(lookup([vol]), blockSizes)
  t.equal(h().start(FIXED).kind, 'continue')
  t.equal(h().start(BOTH).kind, 'continue')
  t.equal(h().start(BOTH | 4).kind, 'close')
  t.equal(h().start(0x80000000 | FIXED).kind, 'close')
  t.equal(h().start(0xffffffff).kind, 'close')
  t.equal(h().start(0).kind, 'close')
  t.end()
})

void t.test('LIST', (t) => {
  // C: LIST (no data)
  t.same(transcript(started().option(Opt.LIST, Buffer.alloc(0)), Opt.LIST), [
    'SERVER vol',
    'SERVER ro',
    'ACK',
    '-> continue',
  ])
  // C: LIST with data
  t.same(transcript(started().option(Opt.LIST, Buffer.from('x')), Opt.LIST), [
    'ERR_INVALID (message)',
    '-> continue',
  ])
  t.same(transcript(started([]).option(Opt.LIST, Buffer.alloc(0)), Opt.LIST), [
    'ACK',
    '-> continue',
  ])
  t.end()
})

void t.test('INFO and GO for a known export', (t) => {
  // C: INFO "vol" asking for NAME and DESCRIPTION
  t.same(
    transcript(
      started().option(Opt.INFO, infoRequest('vol', [Info.NAME, Info.DESCRIPTION])),
      Opt.INFO,
    ),
    [
      `INFO EXPORT size=${1 << 20} flags=${hex(FLAGS_RW)}`,
      'INFO BLOCK_SIZE 1 4096 33554432',
      'INFO NAME vol',
      'INFO DESCRIPTION the test volume',
      'ACK',
      '-> continue',
    ],
  )
  // C: INFO "ro" asking for BLOCK_SIZE; an empty description is not sent
  t.same(
    transcript(
      started().option(Opt.INFO, infoRequest('ro', [Info.BLOCK_SIZE, Info.DESCRIPTION])),
      Opt.INFO,
    ),
    [
      `INFO EXPORT size=4096 flags=${hex(FLAGS_RW | TransmissionFlag.READ_ONLY)}`,
      'INFO BLOCK_SIZE 1 4096 33554432',
      'ACK',
      '-> continue',
    ],
  )
  // C: GO "vol"
  t.same(transcript(started().option(Opt.GO, infoRequest('vol')), Opt.GO), [
    `INFO EXPORT size=${1 << 20} flags=${hex(FLAGS_RW)}`,
    'INFO BLOCK_SIZE 1 4096 33554432',
    'ACK',
    `-> transmission ${JSON.stringify({ exportName: 'vol', flags: FLAGS_RW, structuredReplies: false, baseAllocation: false })}`,
  ])
  t.end()
})

void t.test('INFO and GO for unknown and default names', (t) => {
  t.same(transcript(started().option(Opt.GO, infoRequest('nope')), Opt.GO), [
    'ERR_UNKNOWN (message)',
    '-> continue',
  ])
  t.same(transcript(started().option(Opt.INFO, infoRequest('nope')), Opt.INFO), [
    'ERR_UNKNOWN (message)',
    '-> continue',
  ])
  // "" is the default export only when there is exactly one
  t.same(transcript(started().option(Opt.GO, infoRequest('')), Opt.GO), [
    'ERR_UNKNOWN (message)',
    '-> continue',
  ])
  const one = transcript(started([vol]).option(Opt.GO, infoRequest('', [Info.NAME])), Opt.GO)
  t.same(one.slice(0, 4), [
    `INFO EXPORT size=${1 << 20} flags=${hex(FLAGS_RW)}`,
    'INFO BLOCK_SIZE 1 4096 33554432',
    'INFO NAME vol',
    'ACK',
  ])
  t.match(one[4], /"exportName":"vol"/, 'the canonical name enters transmission')
  t.end()
})

void t.test('INFO and GO with malformed payloads are ERR_INVALID and keep haggling', (t) => {
  const good = infoRequest('vol', [Info.NAME])
  for (const bad of [
    Buffer.alloc(0),
    good.subarray(0, 5),
    good.subarray(0, good.length - 1),
    Buffer.concat([good, Buffer.alloc(1)]),
    u32(0xffffffff),
  ]) {
    for (const option of [Opt.INFO, Opt.GO]) {
      t.same(
        transcript(started().option(option, bad), option),
        ['ERR_INVALID (message)', '-> continue'],
        bad.toString('hex'),
      )
    }
  }
  t.end()
})

void t.test('EXPORT_NAME: 10 bytes with NO_ZEROES, 134 without, hang up on unknown', (t) => {
  const short = started([vol], BOTH).option(Opt.EXPORT_NAME, Buffer.from('vol'))
  t.equal(short.replies.length, 1)
  t.same(
    short.replies[0],
    Buffer.from('0000000000100000' + FLAGS_RW.toString(16).padStart(4, '0'), 'hex'),
  )
  t.equal(short.next.kind, 'transmission')

  const long = started([vol], FIXED).option(Opt.EXPORT_NAME, Buffer.from('vol'))
  t.equal(long.replies[0]?.length, 134)
  t.ok(long.replies[0]?.subarray(10).every((b) => b === 0))
  t.equal(long.next.kind, 'transmission')

  t.same(transcript(started([vol]).option(Opt.EXPORT_NAME, Buffer.from('')), 0).slice(-1), [
    `-> transmission ${JSON.stringify({ exportName: 'vol', flags: FLAGS_RW, structuredReplies: false, baseAllocation: false })}`,
  ])
  const unknown = started().option(Opt.EXPORT_NAME, Buffer.from('nope'))
  t.same(unknown, { replies: [], next: { kind: 'close' } }, 'no error reply exists for EXPORT_NAME')
  t.end()
})

void t.test('STRUCTURED_REPLY', (t) => {
  const h = started()
  // C: STRUCTURED_REPLY with data
  t.same(transcript(h.option(Opt.STRUCTURED_REPLY, Buffer.from('x')), Opt.STRUCTURED_REPLY), [
    'ERR_INVALID (message)',
    '-> continue',
  ])
  // C: GO: no structured replies were negotiated, so no SEND_DF
  t.match(
    transcript(started().option(Opt.GO, infoRequest('vol')), Opt.GO)[3],
    /"structuredReplies":false/,
  )
  // C: STRUCTURED_REPLY
  t.same(transcript(h.option(Opt.STRUCTURED_REPLY, Buffer.alloc(0)), Opt.STRUCTURED_REPLY), [
    'ACK',
    '-> continue',
  ])
  // C: GO: SEND_DF is now advertised
  const go = transcript(h.option(Opt.GO, infoRequest('vol')), Opt.GO)
  t.equal(go[0], `INFO EXPORT size=${1 << 20} flags=${hex(FLAGS_RW | TransmissionFlag.SEND_DF)}`)
  t.match(go[3], /"structuredReplies":true,"baseAllocation":false/)
  t.end()
})

void t.test('meta contexts need structured replies first', (t) => {
  for (const option of [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]) {
    t.same(
      transcript(started().option(option, metaContextRequest('vol', ['base:allocation'])), option),
      ['ERR_INVALID (message)', '-> continue'],
    )
  }
  t.end()
})

function structured(exports: ExportInfo[] = [vol, ro]): Handshake {
  const h = started(exports)
  h.option(Opt.STRUCTURED_REPLY, Buffer.alloc(0))
  return h
}

void t.test('LIST_META_CONTEXT', (t) => {
  const list = (queries: string[], name = 'vol'): string[] =>
    transcript(
      structured().option(Opt.LIST_META_CONTEXT, metaContextRequest(name, queries)),
      Opt.LIST_META_CONTEXT,
    )
  t.same(
    list([]),
    ['META_CONTEXT id=0 base:allocation', 'ACK', '-> continue'],
    'no queries lists everything',
  )
  t.same(list(['base:']), ['META_CONTEXT id=0 base:allocation', 'ACK', '-> continue'])
  t.same(list(['base:allocation']), ['META_CONTEXT id=0 base:allocation', 'ACK', '-> continue'])
  t.same(list(['x-other:thing']), ['ACK', '-> continue'])
  t.same(list([], 'nope'), ['ERR_UNKNOWN (message)', '-> continue'])
  t.end()
})

void t.test('SET_META_CONTEXT base:allocation, then GO the same export', (t) => {
  const h = structured()
  // C: SET_META_CONTEXT "vol" ["base:allocation"]
  t.same(
    transcript(
      h.option(Opt.SET_META_CONTEXT, metaContextRequest('vol', ['base:allocation'])),
      Opt.SET_META_CONTEXT,
    ),
    [`META_CONTEXT id=${BASE_ALLOCATION_ID} base:allocation`, 'ACK', '-> continue'],
  )
  // C: GO "vol"
  const step = h.option(Opt.GO, infoRequest('vol'))
  t.same(step.next, {
    kind: 'transmission',
    start: {
      exportName: 'vol',
      flags: FLAGS_RW | TransmissionFlag.SEND_DF,
      structuredReplies: true,
      baseAllocation: true,
    },
  })
  t.end()
})

void t.test('SET_META_CONTEXT with unknown queries selects nothing', (t) => {
  const h = structured()
  h.option(Opt.SET_META_CONTEXT, metaContextRequest('vol', ['base:allocation']))
  // C: SET_META_CONTEXT "vol" ["x-unknown:foo"] replaces the earlier selection with nothing
  t.same(
    transcript(
      h.option(Opt.SET_META_CONTEXT, metaContextRequest('vol', ['x-unknown:foo'])),
      Opt.SET_META_CONTEXT,
    ),
    ['ACK', '-> continue'],
  )
  t.match(transcript(h.option(Opt.GO, infoRequest('vol')), Opt.GO)[3], /"baseAllocation":false/)
  // C: SET_META_CONTEXT with no queries selects nothing either
  const h2 = structured()
  t.same(
    transcript(
      h2.option(Opt.SET_META_CONTEXT, metaContextRequest('vol', [])),
      Opt.SET_META_CONTEXT,
    ),
    ['ACK', '-> continue'],
  )
  t.end()
})

void t.test('SET_META_CONTEXT for one export, GO another: the context is not active', (t) => {
  const h = structured()
  h.option(Opt.SET_META_CONTEXT, metaContextRequest('ro', ['base:allocation']))
  const step = h.option(Opt.GO, infoRequest('vol'))
  t.equal(step.next.kind, 'transmission')
  if (step.next.kind === 'transmission') t.equal(step.next.start.baseAllocation, false)
  t.end()
})

void t.test('a failed SET_META_CONTEXT still clears the earlier selection', (t) => {
  for (const failing of [
    metaContextRequest('vol', ['base:allocation']).subarray(0, 9), // malformed
    metaContextRequest('nope', ['base:allocation']), // unknown export
  ]) {
    const h = structured()
    h.option(Opt.SET_META_CONTEXT, metaContextRequest('vol', ['base:allocation']))
    // C: SET_META_CONTEXT that fails
    const step = h.option(Opt.SET_META_CONTEXT, failing)
    t.equal(step.replies.length, 1)
    t.match(transcript(step, Opt.SET_META_CONTEXT)[0], /^ERR_/)
    // C: GO "vol": the spec says the failed SET replaced the selection, so no context is active
    const go = h.option(Opt.GO, infoRequest('vol'))
    t.equal(
      go.next.kind === 'transmission' && go.next.start.baseAllocation,
      false,
      failing.toString('hex'),
    )
  }
  t.end()
})

void t.test('meta-context options with malformed payloads are ERR_INVALID', (t) => {
  const good = metaContextRequest('vol', ['base:allocation'])
  for (const bad of [
    Buffer.alloc(0),
    good.subarray(0, 7),
    good.subarray(0, good.length - 1),
    Buffer.concat([good, Buffer.alloc(2)]),
  ]) {
    for (const option of [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]) {
      t.same(
        transcript(structured().option(option, bad), option),
        ['ERR_INVALID (message)', '-> continue'],
        bad.toString('hex'),
      )
    }
  }
  t.end()
})

void t.test('ABORT is acknowledged, then the connection closes', (t) => {
  t.same(transcript(started().option(Opt.ABORT, Buffer.alloc(0)), Opt.ABORT), ['ACK', '-> close'])
  t.end()
})

void t.test('unknown options are ERR_UNSUP and haggling continues', (t) => {
  const h = started()
  for (const option of [
    Opt.PEEK_EXPORT,
    Opt.STARTTLS,
    Opt.EXTENDED_HEADERS,
    12,
    0,
    0x7fffffff,
    0xffffffff,
  ]) {
    t.same(
      transcript(h.option(option, Buffer.from('junk')), option),
      ['ERR_UNSUP (message)', '-> continue'],
      `option ${option}`,
    )
  }
  t.equal(
    h.option(Opt.GO, infoRequest('vol')).next.kind,
    'transmission',
    'a GO still works afterwards',
  )
  t.end()
})

void t.test('STARTTLS: offered, required, refused when off, once only', (t) => {
  const tlsHandshake = (mode: 'off' | 'optional' | 'required'): Handshake => {
    const h = new Handshake(lookup([vol]), blockSizes, mode)
    h.start(BOTH)
    return h
  }
  const none = Buffer.alloc(0)
  // Off: unsupported, and the connection goes on in the clear.
  t.same(transcript(tlsHandshake('off').option(Opt.STARTTLS, none), Opt.STARTTLS), [
    'ERR_UNSUP (message)',
    '-> continue',
  ])
  // Optional: ACK, then the connection turns to TLS; plain options work too.
  const optional = tlsHandshake('optional')
  t.same(transcript(optional.option(Opt.LIST, none), Opt.LIST), [
    'SERVER vol',
    'ACK',
    '-> continue',
  ])
  t.same(transcript(optional.option(Opt.STARTTLS, Buffer.from('x')), Opt.STARTTLS), [
    'ERR_INVALID (message)',
    '-> continue',
  ])
  t.same(transcript(optional.option(Opt.STARTTLS, none), Opt.STARTTLS), ['ACK', '-> starttls'])
  optional.secured()
  t.ok(optional.isSecure)
  t.same(transcript(optional.option(Opt.STARTTLS, none), Opt.STARTTLS), [
    'ERR_INVALID (message)',
    '-> continue',
  ])
  // Required: nothing but STARTTLS (and ABORT) before TLS; EXPORT_NAME can only be hung up on.
  const required = tlsHandshake('required')
  for (const option of [Opt.LIST, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY]) {
    t.same(
      transcript(required.option(option, option === Opt.LIST ? none : infoRequest('vol')), option),
      ['ERR_TLS_REQD (message)', '-> continue'],
      `option ${option} before TLS`,
    )
  }
  t.same(transcript(required.option(Opt.EXPORT_NAME, Buffer.from('vol')), Opt.EXPORT_NAME), [
    '-> close',
  ])
  const secured = tlsHandshake('required')
  t.same(transcript(secured.option(Opt.STARTTLS, none), Opt.STARTTLS), ['ACK', '-> starttls'])
  secured.secured()
  t.same(transcript(secured.option(Opt.LIST, none), Opt.LIST), ['SERVER vol', 'ACK', '-> continue'])
  t.equal(
    transcript(secured.option(Opt.GO, infoRequest('vol')), Opt.GO)
      .at(-1)
      ?.startsWith('-> transmission'),
    true,
    'after TLS the export opens',
  )
  t.same(transcript(tlsHandshake('required').option(Opt.ABORT, none), Opt.ABORT), [
    'ACK',
    '-> close',
  ])
  t.end()
})

void t.test("a volume's access list: hidden from LIST, ERR_POLICY for INFO and GO", (t) => {
  const exports: ExportLookup = {
    ...lookup([vol, ro]),
    refuse: (name, client) =>
      name === 'vol' && client.certificateName !== 'hv1' ? 'not for you' : undefined,
  }
  const as = (certificateName: string | undefined): Handshake => {
    const h = new Handshake(exports, blockSizes, 'off', () => ({
      address: '10.0.0.1',
      certificateName,
    }))
    h.start(BOTH)
    return h
  }
  const none = Buffer.alloc(0)
  t.same(transcript(as('hv2').option(Opt.LIST, none), Opt.LIST), [
    'SERVER ro',
    'ACK',
    '-> continue',
  ])
  t.same(transcript(as('hv2').option(Opt.GO, infoRequest('vol')), Opt.GO), [
    'ERR_POLICY (message)',
    '-> continue',
  ])
  t.same(transcript(as('hv2').option(Opt.EXPORT_NAME, Buffer.from('vol')), Opt.EXPORT_NAME), [
    '-> close',
  ])
  t.equal(
    transcript(as('hv1').option(Opt.GO, infoRequest('vol')), Opt.GO)
      .at(-1)
      ?.startsWith('-> transmission'),
    true,
    'the named client opens it',
  )
  t.end()
})
