/**
 * The WebSocket JupyterLab's kernel connections are given (ServerConnection
 * settings' `WebSocket`): for kernel channels URLs it
 *
 * - keeps, per kernel and client session, the highest `chspawner_seq` it
 *   handed to JupyterLab, and drops any IOPub message at or below it (a copy
 *   the server sent again: it could not know the first one arrived);
 * - asks, on every reconnect of a session, for what is missing:
 *   `chspawner_received=<that seq>` on the URL; on a session's first
 *   connection, the seq of what the page already holds of that kernel (the
 *   notebook's `metadata.chspawner.outputs`), if anything.
 *
 * Every other URL, and every message without a seq (other channels, the
 * server's own notices and rebuilt replies), goes through untouched.
 * JupyterLab sets `onmessage` on its sockets (KernelConnection._createSocket);
 * listeners added with addEventListener("message") are filtered too.
 */
import { IChannelsTarget, parseChannelsUrl, readSeq, withReceived } from './wire';

type Constructor = new (url: string | URL, protocols?: string | string[]) => WebSocket;

/** What the page has received of each kernel, per client session. */
export class ReceivedStore {
  /**
   * @param seed - the seq of what the page already holds of a kernel, for a
   *   session's first connection (null: nothing known)
   */
  constructor(seed: (kernelId: string) => number | null = () => null) {
    this._seed = seed;
  }

  /** The highest seq handed on for the session, or null. */
  get(target: IChannelsTarget): number | null {
    return this._received.get(key(target)) ?? null;
  }

  /** The seq to ask the server to resume after, for a connection about to open. */
  resumeFrom(target: IChannelsTarget): number | null {
    const known = this.get(target);
    if (known !== null) {
      return known;
    }
    const seed = this._seed(target.kernelId);
    if (seed !== null) {
      // The page holds this much already: copies up to it are dropped too.
      this._received.set(key(target), seed);
    }
    return seed;
  }

  /**
   * Whether a message with ``seq`` is new for the session (and then it is
   * recorded as handed on); false for a copy.
   */
  admit(target: IChannelsTarget, seq: number): boolean {
    const last = this.get(target);
    if (last !== null && seq <= last) {
      this.dropped += 1;
      return false;
    }
    this._received.set(key(target), seq);
    return true;
  }

  /** Copies dropped so far (shown in the browser's console, for a look). */
  dropped = 0;

  private _received = new Map<string, number>();
  private _seed: (kernelId: string) => number | null;
}

function key(target: IChannelsTarget): string {
  return `${target.kernelId}\u0000${target.sessionId}`;
}

/** A WebSocket class that applies ``store`` to kernel channels, ``Base`` otherwise. */
export function persistingWebSocket(Base: Constructor, store: ReceivedStore): Constructor {
  return class ChspawnerWebSocket extends Base {
    constructor(url: string | URL, protocols?: string | string[]) {
      const target = parseChannelsUrl(String(url));
      const from = target === null ? null : store.resumeFrom(target);
      super(from === null ? url : withReceived(String(url), from), protocols);
      if (target !== null) {
        filterMessages(this, target, store);
      }
    }
  };
}

type Listener = ((ev: MessageEvent) => any) | null;

/** Hand only new messages to the socket's `onmessage` and message listeners. */
function filterMessages(ws: WebSocket, target: IChannelsTarget, store: ReceivedStore): void {
  // One verdict per event: a socket whose onmessage setter adds a message
  // listener (Playwright's WebSocket mock does) passes it through both.
  const verdicts = new WeakMap<object, boolean>();
  const isNew = (ev: MessageEvent): boolean => {
    let verdict = verdicts.get(ev);
    if (verdict === undefined) {
      const info = readSeq(ev.data, ws.protocol);
      verdict =
        info === null || info.seq === null || info.channel !== 'iopub'
          ? true
          : store.admit(target, info.seq);
      verdicts.set(ev, verdict);
    }
    return verdict;
  };
  let handler: Listener = null;
  let wrapped: Listener = null;
  Object.defineProperty(ws, 'onmessage', {
    configurable: true,
    enumerable: true,
    get: () => handler,
    set: (value: Listener) => {
      handler = value;
      wrapped =
        typeof value === 'function'
          ? function (this: WebSocket, ev: MessageEvent) {
              return isNew(ev) ? value.call(this, ev) : undefined;
            }
          : null;
      // The base class's own accessor: the browser dispatches to it.
      setBaseHandler(ws, wrapped);
    }
  });
  const add = ws.addEventListener.bind(ws);
  const remove = ws.removeEventListener.bind(ws);
  const wrappers = new Map<any, EventListener>();
  ws.addEventListener = ((type: string, listener: any, options?: any) => {
    if (type !== 'message' || listener === null || listener === undefined) {
      return add(type, listener, options);
    }
    let w = wrappers.get(listener);
    if (w === undefined) {
      w = (ev: Event) => {
        if (isNew(ev as MessageEvent)) {
          typeof listener === 'function' ? listener.call(ws, ev) : listener.handleEvent(ev);
        }
      };
      wrappers.set(listener, w);
    }
    return add(type, w, options);
  }) as typeof ws.addEventListener;
  ws.removeEventListener = ((type: string, listener: any, options?: any) => {
    const w = type === 'message' ? wrappers.get(listener) : undefined;
    return remove(type, w ?? listener, options);
  }) as typeof ws.removeEventListener;
}

/** Set `onmessage` through the prototype chain's accessor (the real socket's). */
function setBaseHandler(ws: WebSocket, value: Listener): void {
  let proto = Object.getPrototypeOf(ws);
  while (proto !== null) {
    const descriptor = Object.getOwnPropertyDescriptor(proto, 'onmessage');
    if (descriptor?.set !== undefined) {
      descriptor.set.call(ws, value);
      return;
    }
    proto = Object.getPrototypeOf(proto);
  }
  console.warn('[chspawner] this WebSocket has no onmessage accessor: messages not filtered');
}
