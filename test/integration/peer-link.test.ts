/**
 * The replication transport over real gRPC on 127.0.0.1 (src/replica/peer-link.ts): Hello accept
 * and reject, ordered delivery and batching of 10,000 ops, checksum mismatches reported rather
 * than thrown, back-pressure, shutdown reasons, reconnect, and a peer that goes silent.
 */
import { once } from 'node:events'
import net from 'node:net'
import t from 'tap'
import { PeerLinkClient, PeerLinkError, PeerLinkServer } from '../../src/replica/peer-link.js'
import type {
  HelloDecision,
  LinkClosed,
  PeerReplies,
  PeerStream,
  PeerStreamHandlers,
  ReceivedOp,
} from '../../src/replica/peer-link.js'
import type { Hello } from '../../src/replica/peer-messages.js'

const hello = (volume = 'demo'): Omit<Hello, 'protocolVersion'> => ({
  volume,
  epoch: 4,
  fromNode: 'site-a',
  incarnation: Buffer.from('primary-incarnation'),
})

/** A secondary that records what it receives; acks valid ops, rejects bad checksums. */
class FakeSecondary {
  readonly received: ReceivedOp[] = []
  readonly closes: LinkClosed[] = []
  replies: PeerReplies | undefined
  autoAck = true

  decide(hello: Hello, replies: PeerReplies): HelloDecision {
    if (hello.volume !== 'demo') {
      return { type: 'reject', code: 'VOLUME_NOT_FOUND', message: 'no such volume', epoch: 0 }
    }
    this.replies = replies
    return {
      type: 'accept',
      epoch: hello.epoch,
      appliedSeq: 0,
      handler: {
        onOp: (op) => {
          this.received.push(op)
          if (!this.autoAck) return
          if (op.checksumOk) replies.ack(op.epoch, op.seq)
          else replies.reject(op.epoch, op.seq, 'CHECKSUM_MISMATCH', 'xxh64 differs')
        },
        onFlush: (flush) => {
          replies.flushAck(flush.epoch, flush.flushId)
        },
        onClosed: (reason) => this.closes.push(reason),
      },
    }
  }
}

async function startServer(
  port = 0,
): Promise<{ server: PeerLinkServer; secondary: FakeSecondary; port: number }> {
  const secondary = new FakeSecondary()
  const server = new PeerLinkServer({
    onStream: (h, replies) => secondary.decide(h, replies),
    closeGraceMs: 500,
  })
  const bound = await server.listen('127.0.0.1', port)
  return { server, secondary, port: bound }
}

/** Handlers that record everything into arrays. */
function recorder() {
  const log = {
    acks: [] as number[],
    rejects: [] as { seq: number; code: string }[],
    flushAcks: [] as number[],
    closed: [] as LinkClosed[],
    drained: 0,
  }
  const handlers: PeerStreamHandlers = {
    onAck: (_epoch, seq) => log.acks.push(seq),
    onFlushAck: (_epoch, id) => log.flushAcks.push(id),
    onReject: (_epoch, seq, code) => log.rejects.push({ seq, code }),
    onRejectFlush: () => undefined,
    onClosed: (reason) => log.closed.push(reason),
    onDrained: () => {
      log.drained++
    },
  }
  return { log, handlers }
}

async function until(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const start = Date.now()
  while (!condition()) {
    if (Date.now() - start > timeoutMs) throw new Error('condition not met in time')
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

const block = (seq: number): Buffer => Buffer.alloc(4096, seq & 0xff)

function sendWrite(stream: PeerStream, seq: number, data = block(seq)): void {
  stream.sendOp(
    { epoch: 4, seq, kind: 'write', offset: seq * 4096, length: data.length, fua: false },
    data,
  )
}

void t.test('hello: accepted with the peer incarnation, rejected with a typed error', async (t) => {
  const { server, port } = await startServer()
  const client = new PeerLinkClient()
  client.connect(`127.0.0.1:${port}`)
  t.teardown(async () => {
    client.close()
    await server.close()
  })
  const { handlers } = recorder()
  const stream = await client.openStream(hello(), handlers)
  t.same(stream.helloAck?.incarnation, server.incarnation)
  t.equal(stream.helloAck?.appliedSeq, 0)
  t.ok(
    server.windowsWidened,
    'the HTTP/2 receive windows were widened (grpc-js internals unchanged)',
  )
  const error = await client.openStream(hello('nope'), handlers).catch((e: unknown) => e)
  t.ok(error instanceof PeerLinkError)
  t.equal((error as PeerLinkError).code, 'HELLO_REJECTED')
  t.equal((error as PeerLinkError).rejection?.code, 'VOLUME_NOT_FOUND')
  t.match((error as PeerLinkError).message, /VOLUME_NOT_FOUND: no such volume/)

  const unreachable = new PeerLinkClient()
  unreachable.connect('127.0.0.1:1')
  const refused = await unreachable.openStream(hello(), handlers).catch((e: unknown) => e)
  unreachable.close()
  t.equal((refused as PeerLinkError).code, 'PEER_UNAVAILABLE', 'nothing listening')
})

void t.test('10,000 ops at 32 in flight: order preserved, batched both ways', async (t) => {
  const { server, secondary, port } = await startServer()
  const client = new PeerLinkClient()
  client.connect(`127.0.0.1:${port}`)
  t.teardown(async () => {
    client.close()
    await server.close()
  })
  const { log, handlers } = recorder()
  const total = 10000
  const depth = 32
  let next = 1
  const stream = await client.openStream(hello(), {
    ...handlers,
    onAck: (epoch, seq) => {
      handlers.onAck(epoch, seq)
      if (next <= total) sendWrite(stream, next++)
    },
  })
  while (next <= depth) sendWrite(stream, next++)
  stream.sendFlush(4, 1)
  await until(() => log.acks.length === total, 20000)
  await until(() => log.flushAcks.length === 1)
  t.same(
    secondary.received.map((op) => op.seq),
    Array.from({ length: total }, (_, i) => i + 1),
    'the secondary saw every seq in order',
  )
  t.ok(secondary.received.every((op) => op.checksumOk && op.data.equals(block(op.seq))))
  t.equal(stream.inflightBytes, 0, 'every byte settled')
  const serverStats = server.openStreams[0]?.stats
  t.comment(`client ${JSON.stringify(stream.stats)} server ${JSON.stringify(serverStats)}`)
  t.ok(stream.stats.opBatchesSent < total / 2, 'ops were batched')
  t.ok((serverStats?.ackBatchesSent ?? total) < total / 2, 'acks were batched')
})

void t.test(
  'checksum mismatch: reported with checksumOk=false, rejected, not thrown',
  async (t) => {
    const { server, secondary, port } = await startServer()
    const client = new PeerLinkClient({
      mutateOutgoing: (op, data) => {
        if (op.seq !== 2) return data
        const copy = Buffer.from(data)
        copy[100] = (copy[100] ?? 0) ^ 1
        return copy
      },
    })
    client.connect(`127.0.0.1:${port}`)
    t.teardown(async () => {
      client.close()
      await server.close()
    })
    const { log, handlers } = recorder()
    const stream = await client.openStream(hello(), handlers)
    for (let seq = 1; seq <= 3; seq++) sendWrite(stream, seq)
    await until(() => log.acks.length + log.rejects.length === 3)
    t.same(
      secondary.received.map((op) => [op.seq, op.checksumOk]),
      [
        [1, true],
        [2, false],
        [3, true],
      ],
    )
    t.same(log.rejects, [{ seq: 2, code: 'CHECKSUM_MISMATCH' }])
    t.same(log.acks, [1, 3])
    t.equal(server.openStreams[0]?.stats.checksumMismatches, 1)
  },
)

void t.test(
  'back-pressure: canSend turns false at inflightBytesMax, drained after acks',
  async (t) => {
    const { server, secondary, port } = await startServer()
    secondary.autoAck = false
    const client = new PeerLinkClient({ inflightBytesMax: 1 << 20 })
    client.connect(`127.0.0.1:${port}`)
    t.teardown(async () => {
      client.close()
      await server.close()
    })
    const { log, handlers } = recorder()
    const stream = await client.openStream(hello(), handlers)
    let seq = 1
    while (stream.canSend(4096)) sendWrite(stream, seq++)
    t.equal(seq - 1, 256, '256 x 4 KiB fill 1 MiB')
    t.throws(() => {
      sendWrite(stream, seq)
    }, /inflightBytesMax/)
    await until(() => secondary.received.length === 256)
    t.equal(log.drained, 0)
    for (const op of secondary.received.slice(0, 10)) secondary.replies?.ack(op.epoch, op.seq)
    await until(() => log.drained === 1)
    t.ok(stream.canSend(4096), 'room again')
    t.equal(stream.inflightBytes, 246 * 4096)
  },
)

void t.test(
  'server close: the client sees SHUTTING_DOWN; reconnect opens a new stream',
  async (t) => {
    const first = await startServer()
    const client = new PeerLinkClient()
    client.connect(`127.0.0.1:${first.port}`)
    const { log, handlers } = recorder()
    const stream = await client.openStream(hello(), handlers)
    await first.server.close()
    await until(() => log.closed.length === 1)
    t.same(log.closed[0], {
      code: 'GOODBYE',
      goodbye: 'SHUTTING_DOWN',
      message: 'node shutting down',
    })
    t.equal(first.secondary.closes[0]?.code, 'LOCAL_CLOSE')
    t.notOk(stream.isOpen)

    const second = await startServer(first.port)
    t.teardown(async () => {
      client.close()
      await second.server.close()
    })
    let reopened: PeerStream | undefined
    const start = Date.now()
    while (reopened === undefined && Date.now() - start < 5000) {
      reopened = await client.openStream(hello(), recorder().handlers).catch(() => undefined)
      if (reopened === undefined) await new Promise((resolve) => setTimeout(resolve, 50))
    }
    t.ok(reopened?.isOpen, 'a new stream on the restarted server')
    t.same(reopened?.helloAck?.incarnation, second.server.incarnation)
    t.notSame(second.server.incarnation, first.server.incarnation, 'a restart is distinguishable')
  },
)

void t.test('a silent peer is noticed within a few seconds (keepalive)', async (t) => {
  const { server, port } = await startServer()
  // A TCP relay that can turn into a black hole: sockets stay open, nothing gets through.
  const sockets: net.Socket[] = []
  let blackhole = false
  const relay = net.createServer((inbound) => {
    const outbound = net.connect(port, '127.0.0.1')
    sockets.push(inbound, outbound)
    for (const [from, to] of [
      [inbound, outbound],
      [outbound, inbound],
    ] as const) {
      from.on('data', (chunk) => {
        if (!blackhole) to.write(chunk)
      })
      from.on('error', () => undefined)
    }
  })
  relay.listen(0, '127.0.0.1')
  await once(relay, 'listening')
  const relayPort = (relay.address() as net.AddressInfo).port
  const client = new PeerLinkClient()
  client.connect(`127.0.0.1:${relayPort}`)
  t.teardown(async () => {
    client.close()
    for (const socket of sockets) socket.destroy()
    relay.close()
    server.forceClose()
  })
  const { log, handlers } = recorder()
  const stream = await client.openStream(hello(), handlers)
  sendWrite(stream, 1)
  await until(() => log.acks.length === 1)
  blackhole = true
  const start = Date.now()
  await until(() => log.closed.length === 1, 6000)
  const noticedMs = Date.now() - start
  t.comment(`noticed after ${noticedMs} ms: ${JSON.stringify(log.closed[0])}`)
  t.equal(log.closed[0]?.code, 'PEER_UNAVAILABLE')
  t.ok(noticedMs < 4000, 'within keepalive time + timeout (+ margin)')
})
