/**
 * `duplex volume create|delete|list` on one node's data directory. With the node running, the
 * request goes through its admin socket (the data directory is locked by the node); otherwise
 * the command opens the store itself.
 */
import { DuplexError } from '../core/errors.js'
import { formatSize, parseSize } from '../core/units.js'
import { callAdminSocket, performAdminRequest } from '../daemon/admin-socket.js'
import type { AdminRequest, VolumeSummary } from '../daemon/admin-socket.js'
import { NodeStore } from '../replica/store.js'
import { formatTable } from './output.js'

async function perform(
  dataDir: string,
  request: AdminRequest,
): Promise<VolumeSummary[] | undefined> {
  const response = await callAdminSocket(dataDir, request)
  if (response !== undefined) {
    if (!response.ok) throw new DuplexError(response.code, response.message)
    return response.volumes
  }
  const store = await NodeStore.open(dataDir)
  try {
    return await performAdminRequest(store, request)
  } finally {
    await store.close()
  }
}

export async function createVolume(dataDir: string, name: string, size: string): Promise<void> {
  await perform(dataDir, { op: 'create', name, sizeBytes: parseSize(size) })
  process.stdout.write(`created volume ${name} (${formatSize(parseSize(size))})\n`)
}

export async function deleteVolume(dataDir: string, name: string, yes: boolean): Promise<void> {
  if (!yes) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `deleting volume ${name} destroys its data; run again with --yes to confirm`,
    )
  }
  await perform(dataDir, { op: 'delete', name })
  process.stdout.write(`deleted volume ${name}\n`)
}

export async function listVolumes(dataDir: string, output: 'table' | 'json'): Promise<void> {
  const volumes = (await perform(dataDir, { op: 'list' })) ?? []
  if (output === 'json') {
    process.stdout.write(JSON.stringify(volumes, null, 2) + '\n')
    return
  }
  const rows = volumes.map((v) => [v.name, formatSize(v.sizeBytes), String(v.attachedClients)])
  process.stdout.write(formatTable(['NAME', 'SIZE', 'CLIENTS'], rows))
}
