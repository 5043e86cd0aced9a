/**
 * A small structured logger: one line per event on stderr, `level component message key=value`.
 * Daemons log to stderr so that stdout stays a stable, machine-readable contract (the demo's
 * process lines, a node's ready line).
 */

export type Level = 'debug' | 'info' | 'warn' | 'error'
const order: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 }

export type Fields = Record<string, string | number | bigint | boolean | undefined>

export interface Logger {
  debug(message: string, fields?: Fields): void
  info(message: string, fields?: Fields): void
  warn(message: string, fields?: Fields): void
  error(message: string, fields?: Fields): void
  child(component: string): Logger
}

function formatFields(fields: Fields | undefined): string {
  if (fields === undefined) return ''
  let out = ''
  for (const [key, value] of Object.entries(fields)) {
    if (value === undefined) continue
    const text = String(value)
    out += ` ${key}=${/[\s"=]/.test(text) ? JSON.stringify(text) : text}`
  }
  return out
}

export function createLogger(
  component: string,
  minLevel: Level = (process.env.DUPLEX_LOG_LEVEL as Level | undefined) ?? 'info',
  write: (line: string) => void = (line) => process.stderr.write(line),
): Logger {
  const emit = (level: Level, message: string, fields?: Fields): void => {
    if (order[level] < order[minLevel]) return
    write(`${new Date().toISOString()} ${level} ${component}: ${message}${formatFields(fields)}\n`)
  }
  return {
    debug: (m, f) => {
      emit('debug', m, f)
    },
    info: (m, f) => {
      emit('info', m, f)
    },
    warn: (m, f) => {
      emit('warn', m, f)
    },
    error: (m, f) => {
      emit('error', m, f)
    },
    child: (sub) => createLogger(`${component}.${sub}`, minLevel, write),
  }
}

export const silentLogger: Logger = {
  debug: () => undefined,
  info: () => undefined,
  warn: () => undefined,
  error: () => undefined,
  child: () => silentLogger,
}
