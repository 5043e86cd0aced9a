/**
 * `duplex volume promote|resolve|verify` and `duplex volume status`: replication commands that
 * talk to a volume's nodes over their Peer service, found in the witness's catalog (or in a
 * cluster file with --cluster).
 */
import { DuplexError, errorMessage } from '../core/errors.js'
import { formatEpoch } from '../core/epochs.js'
import { formatSize } from '../core/units.js'
import { findNode } from '../daemon/cluster-config.js'
import { loadCluster } from './catalog-command.js'
import type { ClusterSource } from './catalog-command.js'
import type { ClusterConfig, ClusterNode } from '../daemon/cluster-config.js'
import { PeerControlClient } from '../replica/peer-control.js'
import type { DescribeReply } from '../replica/peer-control.js'
import { formatEndpoint } from '../core/endpoints.js'
import { formatTable } from './output.js'
import { nodeClientOptions } from './credentials.js'

function clientOf(node: ClusterNode): PeerControlClient {
  return new PeerControlClient(
    formatEndpoint(node.replication.host, node.replication.port),
    nodeClientOptions(node.name),
  )
}

function volumeOf(config: ClusterConfig, name: string): ClusterConfig['volumes'][number] {
  const volume = config.volumes.find((v) => v.name === name)
  if (volume === undefined) {
    throw new DuplexError('VOLUME_NOT_FOUND', `the cluster has no volume named ${name}`)
  }
  return volume
}

/** The warning `promote --force` prints: what the admin is risking. */
export function forceWarning(volume: string, node: string, other: string): string {
  return (
    `WARNING: forcing ${node} to run ${volume} alone, without its peer ${other} and without the witness.\n` +
    `  - If ${other} is still running and acknowledging writes (only its link to here is down), both\n` +
    `    replicas now accept writes: a split brain. duplex detects it when they meet again and stops\n` +
    `    resyncing; you then choose the survivor with \`duplex volume resolve ${volume} --keep NODE\`\n` +
    `    and the other replica's writes since the split are lost.\n` +
    `  - If ${node}'s replica is not UpToDate, clients will read data older than what ${other} acknowledged.\n` +
    `Do this only when ${other}'s site and the witness are really gone.\n`
  )
}

/** Moves the primary role of `volume` to `nodeName` without stopping I/O (or forces it). */
export async function promoteVolume(
  source: ClusterSource,
  volumeName: string,
  nodeName: string,
  options: { force: boolean; yes: boolean } = { force: false, yes: false },
): Promise<void> {
  const config = await loadCluster(source)
  const volume = volumeOf(config, volumeName)
  const node = findNode(config, nodeName)
  if (node === undefined || !volume.replicas.includes(nodeName)) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `${nodeName} holds no replica of ${volumeName} (its replicas: ${volume.replicas.join(', ')})`,
    )
  }
  if (options.force) {
    const other = volume.replicas.find((name) => name !== nodeName) ?? '?'
    process.stderr.write(forceWarning(volumeName, nodeName, other))
    if (!options.yes) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        'a forced promotion needs --yes to confirm the risk above',
      )
    }
  }
  const client = clientOf(node)
  try {
    const reply = await client.promote({ volume: volumeName, force: options.force }, 60_000)
    process.stdout.write(
      `${volumeName}: primary is ${reply.primary} (epoch ${formatEpoch(reply.epoch)})` +
        `${options.force ? ', forced: it runs alone' : ''}\n`,
    )
  } finally {
    client.close()
  }
}

/** After a split brain: keep `keep`'s replica; the other one is discarded and refilled. */
export async function resolveVolume(
  source: ClusterSource,
  volumeName: string,
  keep: string,
  yes: boolean,
): Promise<void> {
  const config = await loadCluster(source)
  const volume = volumeOf(config, volumeName)
  if (!volume.replicas.includes(keep)) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `${keep} holds no replica of ${volumeName} (its replicas: ${volume.replicas.join(', ')})`,
    )
  }
  const discard = volume.replicas.find((name) => name !== keep) ?? ''
  const node = findNode(config, discard)
  if (node === undefined)
    throw new DuplexError('INVALID_ARGUMENT', `${discard} is not in the cluster`)
  process.stderr.write(
    `${volumeName}: keeping ${keep}'s replica. ${discard}'s replica is discarded: the writes it ` +
      `acknowledged alone since the split are lost, and it is refilled from ${keep} (a full sync).\n`,
  )
  if (!yes) throw new DuplexError('INVALID_ARGUMENT', 'resolving a split brain needs --yes')
  const client = clientOf(node)
  try {
    await client.resolve({ volume: volumeName, keep }, 60_000)
    process.stdout.write(`${volumeName}: ${discard} now follows ${keep} and is being refilled\n`)
  } finally {
    client.close()
  }
}

interface ReplicaRow {
  volume: string
  node: string
  domain: string
  sizeBytes: number
  role: 'primary' | 'secondary' | 'unknown'
  epoch: number | undefined
  state: string
  error: string | undefined
}

/** Every replica of every volume in the cluster file, as its node describes it. */
export async function replicationStatus(
  source: ClusterSource,
  output: 'table' | 'json',
): Promise<void> {
  const config = await loadCluster(source)
  const rows: ReplicaRow[] = []
  for (const volume of config.volumes) {
    for (const nodeName of volume.replicas) {
      const node = findNode(config, nodeName)
      if (node === undefined) continue
      const client = clientOf(node)
      let reply: DescribeReply | undefined
      let error: string | undefined
      try {
        reply = await client.describe(volume.name, 3000)
      } catch (failure) {
        error = errorMessage(failure)
      } finally {
        client.close()
      }
      rows.push({
        volume: volume.name,
        node: nodeName,
        domain: node.domain,
        sizeBytes: volume.sizeBytes,
        role:
          reply === undefined || reply.epoch === 0
            ? 'unknown'
            : reply.primary === nodeName
              ? 'primary'
              : 'secondary',
        epoch: reply?.epoch,
        state: reply === undefined ? 'unreachable' : reply.state,
        error,
      })
    }
  }
  if (output === 'json') {
    process.stdout.write(JSON.stringify(rows, null, 2) + '\n')
    return
  }
  process.stdout.write(
    formatTable(
      ['VOLUME', 'NODE', 'DOMAIN', 'SIZE', 'ROLE', 'EPOCH', 'STATE'],
      rows.map((r) => [
        r.volume,
        r.node,
        r.domain,
        formatSize(r.sizeBytes),
        r.role,
        r.epoch === undefined ? '-' : String(r.epoch),
        r.error === undefined ? r.state : `${r.state}: ${r.error}`,
      ]),
    ),
  )
}

/** Chunk size `volume verify` compares (and repairs) by. */
const verifyChunkBytes = 1024 * 1024
/** Bytes asked of each node per Checksum call. */
const verifyWindowBytes = 64 * 1024 * 1024
/**
 * A chunk that differs is compared again this often before it counts: the two nodes checksum it
 * at slightly different moments, so a chunk under steady writes can differ in one comparison
 * without differing on disk. (Exact under any load would need the primary to order the
 * comparison against writes, as a sync copy is; see the note on issue 5.)
 */
const verifyRechecks = 10

export interface VerifyResult {
  volume: string
  bytesCompared: number
  chunkBytes: number
  /** Ranges whose chunks differed on every recheck. */
  differences: { offset: number; length: number }[]
  repairedBytes: number
  /** Differences left after the repair (empty when everything matches now). */
  remaining: { offset: number; length: number }[]
}

/**
 * Compares the two replicas of a volume chunk by chunk (xxh64), online. A chunk that differs is
 * compared again a few times, so that a write in flight on one replica is not reported; one that
 * keeps differing is a difference. With `repair`, the primary copies those chunks to the
 * secondary again (ordered against client writes), and they are compared once more.
 */
export async function verifyVolume(
  source: ClusterSource,
  volumeName: string,
  options: { repair: boolean; output: 'table' | 'json' },
): Promise<number> {
  const config = await loadCluster(source)
  const volume = volumeOf(config, volumeName)
  const nodes = volume.replicas.map((name) => {
    const node = findNode(config, name)
    if (node === undefined)
      throw new DuplexError('INVALID_ARGUMENT', `node ${name} is not in the cluster`)
    return node
  })
  const clients = nodes.map(clientOf)
  try {
    const [a, b] = clients as [PeerControlClient, PeerControlClient]
    const described = await Promise.all(clients.map((client) => client.describe(volumeName, 5000)))
    const primaryIndex = described.findIndex((reply, i) => reply.primary === nodes[i]?.name)
    const primary = clients[primaryIndex]
    const sums = async (offset: number, length: number): Promise<[bigint[], bigint[]]> => {
      const request = { volume: volumeName, offset, length, chunkBytes: verifyChunkBytes }
      const [onA, onB] = await Promise.all([
        a.checksum(request, 60_000),
        b.checksum(request, 60_000),
      ])
      return [onA.sums, onB.sums]
    }
    const differing = async (chunks: number[]): Promise<number[]> => {
      const out: number[] = []
      for (const chunk of chunks) {
        const offset = chunk * verifyChunkBytes
        const length = Math.min(verifyChunkBytes, volume.sizeBytes - offset)
        const [onA, onB] = await sums(offset, length)
        if (onA[0] !== onB[0]) out.push(chunk)
      }
      return out
    }
    const progress = process.stderr.isTTY
    let suspects: number[] = []
    for (let offset = 0; offset < volume.sizeBytes; offset += verifyWindowBytes) {
      const length = Math.min(verifyWindowBytes, volume.sizeBytes - offset)
      const [onA, onB] = await sums(offset, length)
      onA.forEach((sum, i) => {
        if (sum !== onB[i]) suspects.push(offset / verifyChunkBytes + i)
      })
      if (progress) {
        const done = offset + length
        process.stderr.write(
          `\rverify ${volumeName}: ${formatSize(done)} of ${formatSize(volume.sizeBytes)} (${Math.floor((done / volume.sizeBytes) * 100)}%)`,
        )
      }
    }
    if (progress) process.stderr.write('\n')
    for (let round = 0; round < verifyRechecks && suspects.length > 0; round++) {
      await new Promise((resolve) => setTimeout(resolve, 200))
      suspects = await differing(suspects)
    }
    const toRanges = (chunks: number[]): { offset: number; length: number }[] =>
      chunks.map((chunk) => ({
        offset: chunk * verifyChunkBytes,
        length: Math.min(verifyChunkBytes, volume.sizeBytes - chunk * verifyChunkBytes),
      }))
    const result: VerifyResult = {
      volume: volumeName,
      bytesCompared: volume.sizeBytes,
      chunkBytes: verifyChunkBytes,
      differences: toRanges(suspects),
      repairedBytes: 0,
      remaining: toRanges(suspects),
    }
    if (options.repair && suspects.length > 0) {
      if (primary === undefined) {
        throw new DuplexError('UNAVAILABLE', `${volumeName} has no primary to repair from`)
      }
      const repaired = await primary.repair(
        { volume: volumeName, ranges: result.differences },
        600_000,
      )
      result.repairedBytes = repaired.bytes
      result.remaining = toRanges(await differing(suspects))
    }
    if (options.output === 'json') {
      process.stdout.write(JSON.stringify(result, null, 2) + '\n')
    } else {
      process.stdout.write(
        `${volumeName}: compared ${formatSize(result.bytesCompared)} in ${formatSize(verifyChunkBytes)} chunks; ` +
          (result.differences.length === 0
            ? 'the replicas are identical'
            : `${result.differences.length} chunks differ`) +
          (options.repair && result.differences.length > 0
            ? `; repaired ${formatSize(result.repairedBytes)}, ${result.remaining.length} still differ`
            : '') +
          '\n',
      )
      for (const range of result.remaining) {
        process.stdout.write(`  differs: ${formatSize(range.length)} at offset ${range.offset}\n`)
      }
      if (!options.repair && result.differences.length > 0) {
        process.stdout.write(`Run again with --repair to copy them from the primary.\n`)
      }
    }
    return result.remaining.length === 0 ? 0 : 1
  } finally {
    for (const client of clients) client.close()
  }
}
