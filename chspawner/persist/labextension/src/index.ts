/**
 * @chspawner/jupyterlab-persist: the page's side of chspawner's exactly-once
 * delivery of kernel output (docs/user/persistent-kernels.md).
 *
 * - Kernel websockets (socket.ts): copies dropped, `chspawner_received` sent
 *   on every reconnect, and on a new page from the notebook's record.
 * - Per notebook: output of executions another page started, put in their
 *   cells (foreign.ts); `metadata.chspawner.outputs` set to what the page has
 *   rendered as each save begins; a save after the server wrote outputs the
 *   page has rendered since goes through without "File Changed" (sources.ts).
 * - A kernel connection JupyterLab gave up on (its seven attempts spent, the
 *   network away for minutes) is tried again as the network comes back.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { DocumentRegistry } from '@jupyterlab/docregistry';
import { INotebookModel, INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, KernelMessage } from '@jupyterlab/services';

import { ForeignOutputs, ICellLike } from './foreign';
import { Reconnector } from './retry';
import kernelSessionPlugin from './kernelsession';
import sessionPlugin from './session';
import { persistingWebSocket, ReceivedStore } from './socket';
import { onlyServerWrites, outputsRecord, sourcesOf } from './sources';
import { acceptDiskVersion } from './upstream';
import { seqOf } from './wire';

const PLUGIN_ID = '@chspawner/jupyterlab-persist:plugin';
/** How long a page waits for a replay to reach what the server wrote to disk. */
const CATCH_UP_MS = 60_000;

/** What the extension follows of one open notebook. */
class NotebookState {
  constructor(readonly panel: NotebookPanel) {
    this.foreign = new ForeignOutputs(id => this.findCell(id));
  }

  /** The kernel connection followed, and the highest seq of it rendered. */
  kernel: Kernel.IKernelConnection | null = null;
  renderedSeq: number | null = null;
  /** Cell ids and sources as last loaded or saved (sources.ts). */
  lastSources = '';
  foreign: ForeignOutputs;
  private _waiters: Array<() => void> = [];

  get model(): INotebookModel | null {
    return this.panel.context.isReady ? this.panel.context.model : null;
  }

  /** The seq of what this notebook holds of ``kernelId``, or null. */
  heldOf(kernelId: string): number | null {
    let held: number | null = null;
    const model = this.model;
    if (model !== null) {
      const record = outputsRecord({ metadata: { chspawner: model.getMetadata('chspawner') } });
      if (record !== null && record.kernel_id === kernelId) {
        held = record.seq;
      }
    }
    if (this.kernel?.id === kernelId && this.renderedSeq !== null) {
      held = Math.max(held ?? this.renderedSeq, this.renderedSeq);
    }
    return held;
  }

  findCell(cellId: string): ICellLike | null {
    const model = this.model;
    if (model === null) {
      return null;
    }
    for (const cell of model.cells) {
      if (cell.id === cellId && cell.type === 'code') {
        return cell as unknown as ICellLike;
      }
    }
    return null;
  }

  rendered(seq: number): void {
    if (this.renderedSeq === null || seq > this.renderedSeq) {
      this.renderedSeq = seq;
      const waiters = this._waiters;
      this._waiters = [];
      waiters.forEach(wake => wake());
    }
  }

  /** Resolves true once ``seq`` is rendered, false after ``ms``. */
  async renderedUpTo(seq: number, ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while ((this.renderedSeq ?? -1) < seq) {
      const left = deadline - Date.now();
      if (left <= 0) {
        return false;
      }
      await new Promise<void>(resolve => {
        const timer = setTimeout(resolve, left);
        this._waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    return true;
  }
}

function activate(app: JupyterFrontEnd, tracker: INotebookTracker): void {
  const states = new Map<NotebookPanel, NotebookState>();
  const store = new ReceivedStore(kernelId => {
    let held: number | null = null;
    for (const state of states.values()) {
      const seq = state.heldOf(kernelId);
      if (seq !== null) {
        held = Math.max(held ?? seq, seq);
      }
    }
    return held;
  });

  // Kernel connections read their WebSocket class from these settings at
  // each (re)connection (KernelConnection._createSocket).
  const settings = app.serviceManager.serverSettings as { WebSocket: typeof WebSocket };
  settings.WebSocket = persistingWebSocket(settings.WebSocket, store) as unknown as typeof WebSocket;

  const follow = (panel: NotebookPanel): void => {
    if (states.has(panel)) {
      return;
    }
    const state = new NotebookState(panel);
    states.set(panel, state);
    panel.disposed.connect(() => states.delete(panel));
    const context = panel.context;
    void context.ready.then(() => {
      state.lastSources = sourcesOf(context.model.toJSON());
    });
    let saving = '';
    context.saveState.connect((_: unknown, change: DocumentRegistry.SaveState) => {
      if (change === 'started') {
        recordOutputs(state);
        saving = sourcesOf(context.model.toJSON());
      } else if (change === 'completed') {
        state.lastSources = saving;
      }
    });
    const onKernel = (): void => {
      const kernel = panel.sessionContext.session?.kernel ?? null;
      if (kernel !== null && kernel !== state.kernel) {
        followKernel(app, state, kernel);
      }
    };
    panel.sessionContext.kernelChanged.connect(onKernel);
    onKernel();
  };
  tracker.forEach(follow);
  tracker.widgetAdded.connect((_, panel) => follow(panel));
  console.info(`[chspawner] ${PLUGIN_ID} is active`);
}

/** Set the notebook's record of the kernel output it holds (a save is beginning). */
function recordOutputs(state: NotebookState): void {
  const model = state.model;
  const kernel = state.kernel;
  if (model === null || kernel === null || state.renderedSeq === null) {
    return;
  }
  const before = (model.getMetadata('chspawner') ?? {}) as Record<string, any>;
  const record = outputsRecord({ metadata: { chspawner: before } });
  if (record?.kernel_id === kernel.id && record.seq === state.renderedSeq) {
    return;
  }
  model.setMetadata('chspawner', {
    ...before,
    outputs: { kernel_id: kernel.id, seq: state.renderedSeq }
  });
}

function followKernel(
  app: JupyterFrontEnd,
  state: NotebookState,
  kernel: Kernel.IKernelConnection
): void {
  state.kernel = kernel;
  // What the notebook already holds of this kernel counts as rendered.
  state.renderedSeq = null;
  const held = state.heldOf(kernel.id);
  if (held !== null) {
    state.rendered(held);
  }
  const current = (): boolean => state.kernel === kernel && !kernel.isDisposed;

  kernel.anyMessage.connect((_, args: Kernel.IAnyMessageArgs) => {
    if (current() && args.direction === 'send') {
      state.foreign.sent(args.msg as any);
    }
  });
  kernel.iopubMessage.connect((_, msg: KernelMessage.IIOPubMessage) => {
    if (!current()) {
      return;
    }
    state.foreign.received(msg as any);
    const seq = seqOf(msg.metadata);
    if (seq !== null) {
      state.rendered(seq);
    }
  });

  // Reconnecting after JupyterLab gave up (retry.ts).
  const reconnector = new Reconnector(kernel);
  const onOnline = (): void => reconnector.nudge();
  const onVisible = (): void => {
    if (document.visibilityState === 'visible') {
      reconnector.nudge();
    }
  };
  window.addEventListener('online', onOnline);
  document.addEventListener('visibilitychange', onVisible);
  // Every connection, the first one too: a page loaded (reloaded) while the
  // server was writing into the notebook may have loaded it just before the
  // server's last write.
  const check = (): void => {
    void reconcile(app, state, kernel).catch(error =>
      console.warn('[chspawner] checking the notebook on disk failed:', error)
    );
  };
  kernel.connectionStatusChanged.connect((_, status: Kernel.ConnectionStatus) => {
    if (!current()) {
      return;
    }
    reconnector.statusChanged(status);
    if (status === 'connected') {
      check();
    }
  });
  if (kernel.connectionStatus === 'connected') {
    check();
  }
  kernel.disposed.connect(() => {
    reconnector.dispose();
    window.removeEventListener('online', onOnline);
    document.removeEventListener('visibilitychange', onVisible);
  });
}

/**
 * After a (re)connection: if the server wrote outputs into the notebook while
 * the page was away or loading (protocol section 4) and the page has rendered
 * them all by now (the replay), take the file on disk as the page's last save.
 */
async function reconcile(
  app: JupyterFrontEnd,
  state: NotebookState,
  kernel: Kernel.IKernelConnection
): Promise<void> {
  const context = state.panel.context;
  const known = context.contentsModel;
  if (!context.isReady || known === null) {
    return;
  }
  const contents = app.serviceManager.contents;
  const stat = await contents.get(context.path, { content: false, hash: true });
  if (sameVersion(known, stat)) {
    return;
  }
  const disk = await contents.get(context.path, { content: true, hash: true, type: 'notebook' });
  const record = outputsRecord(disk.content);
  if (record === null || record.kernel_id !== kernel.id) {
    return; // not the server's writes of this kernel's output: JupyterLab asks
  }
  if (!(await state.renderedUpTo(record.seq, CATCH_UP_MS))) {
    return;
  }
  if (!onlyServerWrites(disk.content, state.lastSources, kernel.id, state.renderedSeq)) {
    return;
  }
  if (acceptDiskVersion(context, disk)) {
    console.info(
      `[chspawner] ${context.path}: the server's writes of outputs up to ${record.seq} ` +
        'are rendered here; the next save replaces them'
    );
  }
}

function sameVersion(known: any, disk: any): boolean {
  if (known.hash && disk.hash) {
    return known.hash === disk.hash;
  }
  return known.last_modified === disk.last_modified;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description:
    "chspawner's persistent kernels: kernel output exactly once across reconnects, " +
    "other pages' output in its cells, the notebook's record of what it holds",
  autoStart: true,
  requires: [INotebookTracker],
  activate
};

// (and the session's Slurm jobs: session.ts; a kernel's session saved,
// restored and moved on request: kernelsession.ts)
export default [plugin, sessionPlugin, kernelSessionPlugin];
