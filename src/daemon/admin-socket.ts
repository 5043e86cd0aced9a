/**
 * The node's local admin endpoint: a Unix socket in the data directory that takes one JSON
 * request per line and answers one JSON line. It lets `duplex volume create|delete|list` act on a
 * running node, whose data directory is locked against every other process. Only local users who
 * can reach the data directory can reach it (the socket is created mode 0600).
 *
 * The catalog (issue 5) will move volume management to the witness; this endpoint then remains
 * for node-local diagnostics.
 */
import fs from 'node:fs/promises'
import net from 'node:net'
import path from 'node:path'
import { DuplexError, errorMessage, isDuplexError } from '../core/errors.js'
import type { ErrorCode } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type { NodeStore } from '../replica/store.js'

export type AdminRequest =
  | { op: 'create'; name: string; sizeBytes: number }
  | { op: 'delete'; name: string }
  | { op: 'list' }

export interface VolumeSummary {
  name: string
  sizeBytes: number
  attachedClients: number
}

export type AdminResponse =
  { ok: true; volumes?: VolumeSummary[] } | { ok: false; code: ErrorCode; message: string }

export interface AdminHandler {
  handle(request: AdminRequest): Promise<VolumeSummary[] | undefined>
}

const REQUEST_BYTES_MAX = 64 * 1024

/** Carries out one admin request on a store: the node's socket and the CLI's offline path. */
export async function performAdminRequest(
  store: NodeStore,
  request: AdminRequest,
): Promise<VolumeSummary[] | undefined> {
  switch (request.op) {
    case 'create':
      await store.create(request.name, request.sizeBytes)
      return undefined
    case 'delete':
      await store.delete(request.name)
      return undefined
    case 'list':
      return store.list().map((v) => ({
        name: v.name,
        sizeBytes: v.sizeBytes,
        attachedClients: v.attachedClients,
      }))
  }
}

export function adminSocketPath(dataDir: string): string {
  return path.join(dataDir, 'admin.sock')
}

export class AdminSocketServer {
  private readonly server: net.Server

  constructor(
    private readonly handler: AdminHandler,
    private readonly log: Logger,
  ) {
    this.server = net.createServer((socket) => {
      this.serve(socket)
    })
  }

  async listen(socketPath: string): Promise<void> {
    await fs.rm(socketPath, { force: true })
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen(socketPath, () => {
        this.server.off('error', reject)
        resolve()
      })
    })
    await fs.chmod(socketPath, 0o600)
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => {
      this.server.close(() => {
        resolve()
      })
    })
  }

  private serve(socket: net.Socket): void {
    let buffered = ''
    socket.setEncoding('utf8')
    socket.on('error', () => undefined)
    socket.on('data', (text: string) => {
      buffered += text
      if (buffered.length > REQUEST_BYTES_MAX) {
        socket.end(JSON.stringify(failure('INVALID_ARGUMENT', 'request too large')) + '\n')
        return
      }
      const newline = buffered.indexOf('\n')
      if (newline < 0) return
      const line = buffered.slice(0, newline)
      buffered = ''
      void this.answer(line).then((response) => socket.end(JSON.stringify(response) + '\n'))
    })
  }

  private async answer(line: string): Promise<AdminResponse> {
    let request: AdminRequest
    try {
      request = parseRequest(JSON.parse(line) as unknown)
    } catch (error) {
      return failure('INVALID_ARGUMENT', `bad admin request: ${errorMessage(error)}`)
    }
    try {
      const volumes = await this.handler.handle(request)
      return volumes === undefined ? { ok: true } : { ok: true, volumes }
    } catch (error) {
      if (isDuplexError(error)) return failure(error.code, error.message)
      this.log.error('admin request failed', { op: request.op, error: errorMessage(error) })
      return failure('IO_ERROR', errorMessage(error))
    }
  }
}

function failure(code: ErrorCode, message: string): AdminResponse {
  return { ok: false, code, message }
}

function parseRequest(value: unknown): AdminRequest {
  if (typeof value !== 'object' || value === null) throw new Error('not an object')
  const v = value as Record<string, unknown>
  switch (v.op) {
    case 'list':
      return { op: 'list' }
    case 'delete':
      if (typeof v.name !== 'string') throw new Error('delete needs a name')
      return { op: 'delete', name: v.name }
    case 'create':
      if (typeof v.name !== 'string' || typeof v.sizeBytes !== 'number') {
        throw new Error('create needs a name and sizeBytes')
      }
      return { op: 'create', name: v.name, sizeBytes: v.sizeBytes }
    default:
      throw new Error(`unknown op ${JSON.stringify(v.op)}`)
  }
}

/**
 * Sends one request to a running node. Resolves to undefined when no node is listening (the
 * caller then opens the store itself); rejects with the node's typed error otherwise.
 */
export async function callAdminSocket(
  dataDir: string,
  request: AdminRequest,
): Promise<AdminResponse | undefined> {
  const socketPath = adminSocketPath(dataDir)
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath)
    let received = ''
    socket.setEncoding('utf8')
    socket.on('connect', () => socket.write(JSON.stringify(request) + '\n'))
    socket.on('data', (text: string) => (received += text))
    socket.on('end', () => {
      try {
        resolve(JSON.parse(received) as AdminResponse)
      } catch {
        reject(new DuplexError('IO_ERROR', `node at ${socketPath} sent an unreadable answer`))
      }
    })
    socket.on('error', (error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT' || error.code === 'ECONNREFUSED') resolve(undefined)
      else
        reject(new DuplexError('IO_ERROR', `cannot reach node at ${socketPath}: ${error.message}`))
    })
  })
}
