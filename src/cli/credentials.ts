/**
 * The admin CLI's cluster TLS credentials: `--credentials DIR` or env DUPLEX_CREDENTIALS, a
 * directory with ca-cert.pem, cert.pem and key.pem (`duplex cert issue NAME --kind admin`).
 * `main` names the directory once; the files are read at the first connection, so a command
 * that connects nowhere never fails on them. Without a directory the CLI speaks plaintext.
 */
import type * as grpc from '@grpc/grpc-js'
import { credentialFiles, TlsCredentials } from '../core/tls.js'
import { createLogger } from '../core/log.js'

let directory: string | undefined
let loaded: TlsCredentials | undefined

export function useCredentials(dir: string | undefined): void {
  directory = dir === '' ? undefined : dir
  loaded = undefined
}

function credentials(): TlsCredentials | undefined {
  if (directory === undefined) return undefined
  loaded ??= new TlsCredentials({
    files: credentialFiles(directory),
    log: createLogger('duplex'),
    reloadMs: 0,
  })
  return loaded
}

/** Options for a client of the witness (its certificate must be a duplex-witness one). */
export function witnessClientOptions(): { credentials?: grpc.ChannelCredentials } {
  const tls = credentials()
  return tls === undefined ? {} : { credentials: tls.channelCredentials({ role: 'witness' }) }
}

/** Options for a client of node `name` (its certificate must name it). */
export function nodeClientOptions(name: string): { credentials?: grpc.ChannelCredentials } {
  const tls = credentials()
  return tls === undefined ? {} : { credentials: tls.channelCredentials({ role: 'node', name }) }
}
