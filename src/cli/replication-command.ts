/**
 * `duplex volume promote` and `duplex volume status`: replication commands that talk to the nodes
 * named in the cluster file over their Peer service (the witness's admin API replaces the file
 * in a later issue).
 */
import { DuplexError, errorMessage } from '../core/errors.js'
import { formatSize } from '../core/units.js'
import { findNode, readClusterConfig } from '../daemon/cluster-config.js'
import type { ClusterConfig, ClusterNode } from '../daemon/cluster-config.js'
import { PeerControlClient } from '../replica/peer-control.js'
import type { DescribeReply } from '../replica/peer-control.js'
import { formatEndpoint } from '../core/endpoints.js'
import { formatTable } from './output.js'

function clientOf(node: ClusterNode): PeerControlClient {
  return new PeerControlClient(formatEndpoint(node.replication.host, node.replication.port))
}

function volumeOf(config: ClusterConfig, name: string): ClusterConfig['volumes'][number] {
  const volume = config.volumes.find((v) => v.name === name)
  if (volume === undefined) {
    throw new DuplexError('VOLUME_NOT_FOUND', `the cluster file places no volume named ${name}`)
  }
  return volume
}

/** Moves the primary role of `volume` to `nodeName` without stopping I/O. */
export async function promoteVolume(
  clusterPath: string,
  volumeName: string,
  nodeName: string,
): Promise<void> {
  const config = await readClusterConfig(clusterPath)
  const volume = volumeOf(config, volumeName)
  const node = findNode(config, nodeName)
  if (node === undefined || !volume.replicas.includes(nodeName)) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `${nodeName} holds no replica of ${volumeName} (its replicas: ${volume.replicas.join(', ')})`,
    )
  }
  const client = clientOf(node)
  try {
    const reply = await client.promote({ volume: volumeName }, 60_000)
    process.stdout.write(`${volumeName}: primary is ${reply.primary} (epoch ${reply.epoch})\n`)
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
  clusterPath: string,
  output: 'table' | 'json',
): Promise<void> {
  const config = await readClusterConfig(clusterPath)
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
