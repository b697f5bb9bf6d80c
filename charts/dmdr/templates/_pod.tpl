{{/*
The pod template shared by every launcher's pods. The controller adds the rendezvous
environment (PET_*, plus MASTER_ADDR/PORT, WORLD_SIZE, RANK from the training operator);
torchrun reads the PET_* variables itself, so the command names none of them. The trainer
container is named for PyTorchJob ("pytorch"); a launcher whose controller looks for another
name passes it as .container (Trainer v2: "node"), e.g. (merge (dict "container" "node") $).
*/}}
{{- define "dmdr.podTemplate" -}}
{{- $v := .Values -}}
{{- $container := .container | default "pytorch" -}}
metadata:
  labels:
    {{- include "dmdr.labels" . | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    kubectl.kubernetes.io/default-container: {{ $container }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with include "dmdr.launcherPodSpec" . }}
  {{- . | trim | nindent 2 }}
  {{- end }}
  {{- include "dmdr.podSpec" . | nindent 2 }}
  containers:
    - name: {{ $container }}
      image: {{ include "dmdr.image" . | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      # torchrun, but a SIGTERM-driven stop exits 143 (torchrun alone exits 1, which
      # restartPolicy ExitCode treats as a permanent failure of the job).
      command:
        - python
        - -m
        - dmdr.launch.run
      args:
        - --nproc-per-node={{ include "dmdr.procsPerPod" . }}
        # SIGKILL for the workers this long after SIGTERM (torchrun's default is 30 s).
        - --shutdown-timeout={{ include "dmdr.shutdownTimeout" . }}
        {{- with $v.torchrun }}
        {{- with .logDir }}
        - --log-dir={{ . }}
        {{- end }}
        {{- with .tee }}
        - --tee={{ . }}
        {{- end }}
        {{- with .redirects }}
        - --redirects={{ . }}
        {{- end }}
        {{- with .localRanksFilter }}
        - --local-ranks-filter={{ . }}
        {{- end }}
        {{- end }}
        - -m
        - dmdr
        - train
        - --config
        - /etc/dmdr/config.yaml
        - --resume-ckpt
        - auto
        {{- range $v.training.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      {{- if eq $container "pytorch" }}
      ports:
        # The operator builds MASTER_PORT / PET_RDZV_ENDPOINT from the port with this name.
        - name: pytorchjob-port
          containerPort: {{ $v.distributed.port }}
          protocol: TCP
      {{- end }}
      {{- with $v.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        {{- include "dmdr.env" . | nindent 8 }}
      resources:
        {{- with $v.resources.requests }}
        requests:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- if or $v.resources.limits (gt (int $v.resources.gpusPerPod) 0) }}
        limits:
          {{- with $v.resources.limits }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
          {{- if gt (int $v.resources.gpusPerPod) 0 }}
          {{ $v.resources.gpuResourceName }}: {{ $v.resources.gpusPerPod }}
          {{- end }}
        {{- end }}
      securityContext:
        {{- include "dmdr.containerSecurityContext" (dict "add" $v.podSecurity.addCapabilities) | nindent 8 }}
      volumeMounts:
        {{- include "dmdr.volumeMounts" . | trim | nindent 8 }}
    {{- with $v.extraContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumes:
    {{- include "dmdr.volumes" . | trim | nindent 4 }}
{{- end }}

{{/*
Pod spec fields of the training pods, shared with the eval Job's pod (context: the root, with
"evalPod" true for the eval pod, e.g. (merge (dict "evalPod" true) $)). The eval pod, one
process that reads the run from the store, leaves out what belongs to the distributed job:
the trainer's shutdown grace, the gang scheduler, hostNetwork (NCCL's NICs) and
topologySpreadConstraints (spreading the job's pods); its nodeSelector, tolerations and
affinity are eval.*, falling back to the training pods'.
*/}}
{{- define "dmdr.podSpec" -}}
{{- $v := .Values -}}
{{- $eval := .evalPod | default false -}}
serviceAccountName: {{ include "dmdr.serviceAccountName" . }}
automountServiceAccountToken: {{ $v.automountServiceAccountToken }}
# Service links would add an env var per Service in the namespace; training needs none.
enableServiceLinks: false
{{- if not $eval }}
terminationGracePeriodSeconds: {{ $v.job.terminationGracePeriodSeconds }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with ternary $v.schedulerName (include "dmdr.schedulerName" .) $eval }}
schedulerName: {{ . | quote }}
{{- end }}
{{- with $v.runtimeClassName }}
runtimeClassName: {{ . | quote }}
{{- end }}
{{- if and $v.hostNetwork (not $eval) }}
hostNetwork: true
# Pod and Service names still resolve through the cluster DNS.
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with ternary ($v.eval.nodeSelector | default $v.nodeSelector) $v.nodeSelector $eval }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ternary ($v.eval.tolerations | default $v.tolerations) $v.tolerations $eval }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ternary ($v.eval.affinity | default $v.affinity) $v.affinity $eval }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if not $eval }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ $v.podSecurity.runAsUser }}
  runAsGroup: {{ $v.podSecurity.runAsGroup }}
  {{- if not (kindIs "invalid" $v.podSecurity.fsGroup) }}
  fsGroup: {{ $v.podSecurity.fsGroup }}
  fsGroupChangePolicy: {{ $v.podSecurity.fsGroupChangePolicy }}
  {{- end }}
  {{- with $v.podSecurity.supplementalGroups }}
  supplementalGroups:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  seccompProfile:
    type: RuntimeDefault
{{- with $v.initContainers }}
initContainers:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The trainer container's volume mounts; the eval container's (.evalPod) leave out the
     ConfigMap, /dev/shm and the outputs (it reads the run from the store). */}}
{{- define "dmdr.volumeMounts" -}}
{{- $v := .Values -}}
{{- $eval := .evalPod | default false -}}
{{- if not $eval }}
- name: config
  mountPath: /etc/dmdr
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- end }}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/dmdr
- name: cache
  mountPath: /home/dmdr/.cache
  {{- with $v.storage.cache.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
{{- if not $eval }}
- name: outputs
  mountPath: /workspace/outputs
  {{- with $v.storage.outputs.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
{{- end }}
{{- with $v.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The volumes of dmdr.volumeMounts (same context); without a cache PVC the eval pod's
     cache emptyDir has its own size limit (eval.cacheSizeLimit). */}}
{{- define "dmdr.volumes" -}}
{{- $v := .Values -}}
{{- $eval := .evalPod | default false -}}
{{- if not $eval }}
- name: config
  configMap:
    name: {{ include "dmdr.configMapName" . }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.shm.sizeLimit | quote }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.storage.tmp.sizeLimit | quote }}
- name: home
  emptyDir:
    sizeLimit: {{ $v.storage.home.sizeLimit | quote }}
- name: cache
  {{- if or $v.storage.cache.existingClaim $v.storage.cache.create.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "dmdr.cacheClaimName" . }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ ternary $v.eval.cacheSizeLimit $v.storage.cache.sizeLimit $eval | quote }}
  {{- end }}
{{- if not $eval }}
- name: outputs
  {{- if $v.storage.outputs.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $v.storage.outputs.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $v.storage.outputs.sizeLimit | quote }}
  {{- end }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The container environment; credentials only ever as secretKeyRef. The eval pod's
     (.evalPod) has no rendezvous or NCCL variables: it is one process. */}}
{{- define "dmdr.env" -}}
{{- $v := .Values -}}
{{- $eval := .evalPod | default false -}}
- name: HOME
  value: /home/dmdr
- name: TMPDIR
  value: /tmp
- name: XDG_CACHE_HOME
  value: /home/dmdr/.cache
- name: HF_HOME
  value: /home/dmdr/.cache/huggingface
- name: TRITON_CACHE_DIR
  value: /home/dmdr/.cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /home/dmdr/.cache/torchinductor
{{- if and (include "dmdr.c10d" .) (not $eval) }}
{{- /* torchrun shares its rendezvous TCP store across rounds by default: a replaced pod's
       agent then joins a later round and waits forever for a master address that the
       surviving rank-0 agent never republishes. One store per round avoids the hang. */}}
- name: TORCH_DISABLE_SHARE_RDZV_TCP_STORE
  value: "1"
{{- end }}
{{- if and (eq $v.distributed.backend "nccl") (not $eval) }}
- name: NCCL_DEBUG
  value: {{ $v.nccl.debug | quote }}
{{- with $v.nccl.socketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := $v.nccl.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- with $v.storage.s3 }}
{{- if .uri }}
{{- /* One writer per run: every pod and restart of this job shares the id in the run's lease;
       another install (or a zombie pod of an earlier revision) is refused while it renews it. */}}
- name: DMDR_JOB_ID
  value: {{ printf "%s-%d" $.Release.Name $.Release.Revision | quote }}
- name: DMDR_S3_URI
  value: {{ .uri | quote }}
{{- end }}
{{- /* The connection also serves an s3:// training.initCkpt without a store of the run's own. */}}
{{- if include "dmdr.usesS3" $ }}
- name: DMDR_S3_PATH_STYLE
  value: {{ .pathStyle | toString | quote }}
{{- with .endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- if eq .credentials.source "secret" }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .credentials.existingSecret }}
      key: {{ .credentials.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .credentials.existingSecret }}
      key: {{ .credentials.secretAccessKeyKey | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $v.hfToken.key | quote }}
{{- end }}
{{- with $v.tracking.wandb }}
{{- if .apiKeySecret }}
- name: WANDB_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .apiKeySecret }}
      key: {{ .apiKeyKey | quote }}
{{- end }}
{{- with .baseUrl }}
- name: WANDB_BASE_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with $v.tracking.mlflow }}
{{- with .trackingUri }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- if .tokenSecret }}
- name: MLFLOW_TRACKING_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .tokenSecret }}
      key: {{ .tokenKey | quote }}
{{- end }}
{{- end }}
{{- if not $eval }}
{{- include "dmdr.launcherEnv" . }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
