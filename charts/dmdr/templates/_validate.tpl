{{/*
Checks that values.schema.json cannot express: combinations of values. Each failure is one
sentence naming the values involved and the fix. Included once, from the launcher's template.
*/}}
{{- define "dmdr.validate" -}}
{{- $v := .Values }}
{{- $replicas := int $v.job.replicas }}
{{- $gpus := int $v.resources.gpusPerPod }}

{{- if not $v.image.repository }}
{{- fail "image.repository is empty: set it to the image built by `make build-and-push`, e.g. --set image.repository=registry.example.com/dmdr" }}
{{- end }}
{{- if regexMatch "(:[^/]*|@.*)$" $v.image.repository }}
{{- fail (printf "image.repository %q already carries a tag or digest, so the image would be %q: set image.repository without it and the tag in image.tag (or image.digest)" $v.image.repository (include "dmdr.image" .)) }}
{{- end }}

{{- $job := include "dmdr.jobName" . }}
{{- if not (regexMatch "^[a-z]" $job) }}
{{- fail (printf "the PyTorchJob would be named %q, but the training operator names Services after it and they must start with a letter: choose a release name that starts with a letter, or set fullnameOverride" $job) }}
{{- end }}

{{- $indexed := has $v.launcher (list "indexedjob" "jobset") }}
{{- if include "dmdr.elastic" . }}
{{- $min := int $v.elastic.minReplicas }}
{{- $max := int $v.elastic.maxReplicas }}
{{- if lt $max $min }}
{{- fail (printf "elastic.maxReplicas (%d) is smaller than elastic.minReplicas (%d): raise maxReplicas or lower minReplicas" $max $min) }}
{{- end }}
{{- if or (lt $replicas $min) (gt $replicas $max) }}
{{- fail (printf "job.replicas (%d) is outside elastic.minReplicas..maxReplicas (%d..%d): set job.replicas within that range" $replicas $min $max) }}
{{- end }}
{{- end }}

{{- if and (eq $v.distributed.backend "nccl") (eq $gpus 0) }}
{{- fail "distributed.backend is nccl but resources.gpusPerPod is 0: NCCL needs GPUs; set resources.gpusPerPod >= 1, or distributed.backend=gloo for a CPU-only run" }}
{{- end }}
{{- if and (gt $gpus 0) $v.distributed.procsPerPod (ne (int $v.distributed.procsPerPod) $gpus) }}
{{- fail (printf "distributed.procsPerPod (%d) differs from resources.gpusPerPod (%d): with GPUs torchrun starts one process per GPU; remove distributed.procsPerPod" (int $v.distributed.procsPerPod) $gpus) }}
{{- end }}
{{- range $name, $_ := merge (dict) $v.resources.requests $v.resources.limits }}
{{- if eq $name $v.resources.gpuResourceName }}
{{- fail (printf "resources.requests/limits name %s: set the GPU count with resources.gpusPerPod instead (it also sets the processes per pod)" $name) }}
{{- end }}
{{- end }}

{{- $s3 := $v.storage.s3 }}
{{- if include "dmdr.usesS3" . }}
{{- if and (eq $s3.credentials.source "secret") (not $s3.credentials.existingSecret) }}
{{- fail "storage.s3.credentials.existingSecret is empty: create a Secret with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (see k8s/s3-secret.example.yaml) and name it here, or set storage.s3.credentials.source=serviceAccount to use IRSA / workload identity" }}
{{- end }}
{{- if and (eq $s3.credentials.source "serviceAccount") (not $v.serviceAccount.create) (not $v.serviceAccount.name) }}
{{- fail "storage.s3.credentials.source=serviceAccount needs a service account bound to a cloud role: set serviceAccount.create=true with serviceAccount.annotations (e.g. eks.amazonaws.com/role-arn), or serviceAccount.name of an existing one" }}
{{- end }}
{{- else if or $s3.endpointUrl $s3.credentials.existingSecret }}
{{- fail "storage.s3.endpointUrl or storage.s3.credentials.existingSecret is set but storage.s3.uri is empty: set storage.s3.uri=s3://bucket/prefix" }}
{{- end }}

{{- $t := int $v.job.terminationGracePeriodSeconds }}
{{- with $v.torchrun.shutdownTimeout }}
{{- if gt (int .) (sub $t 10) }}
{{- fail (printf "torchrun.shutdownTimeout (%d s) does not fit job.terminationGracePeriodSeconds (%d s): the kubelet would SIGKILL torchrun before it stops its workers; set it to at most %d or raise terminationGracePeriodSeconds" (int .) $t (sub $t 10)) }}
{{- end }}
{{- if lt (int .) 20 }}
{{- fail (printf "torchrun.shutdownTimeout (%d s) leaves the trainer less than 10 s to save and upload on SIGTERM: set it to at least 20, or null for job.terminationGracePeriodSeconds minus 10" (int .)) }}
{{- end }}
{{- end }}
{{- with $v.torchrun.logDir }}
{{- $dir := . }}
{{- $writable := list "/tmp" "/home/dmdr" "/workspace/outputs" }}
{{- range $v.extraVolumeMounts }}
{{- if not .readOnly }}{{ $writable = append $writable .mountPath }}{{ end }}
{{- end }}
{{- $ok := false }}
{{- range $writable }}
{{- if or (eq $dir .) (hasPrefix (printf "%s/" (trimSuffix "/" .)) $dir) }}{{ $ok = true }}{{ end }}
{{- end }}
{{- if not $ok }}
{{- fail (printf "torchrun.logDir %s is on the container's read-only root filesystem: put it under /workspace/outputs (kept with the run), /tmp, /home/dmdr or a writable extraVolumeMounts path" $dir) }}
{{- end }}
{{- end }}

{{- if and $v.gangScheduling.enabled $v.gangScheduling.schedulerName $v.schedulerName (ne $v.gangScheduling.schedulerName $v.schedulerName) }}
{{- fail (printf "schedulerName (%s) and gangScheduling.schedulerName (%s) differ: the pods have one scheduler; set only gangScheduling.schedulerName for gang scheduling" $v.schedulerName $v.gangScheduling.schedulerName) }}
{{- end }}

{{- with $v.resources.limits.memory }}
{{- if gt (include "dmdr.bytes" $v.shm.sizeLimit | float64) (include "dmdr.bytes" . | float64) }}
{{- fail (printf "shm.sizeLimit (%v) is above resources.limits.memory (%v): /dev/shm pages count against the memory limit, so the pod would be OOM-killed before /dev/shm is full; lower shm.sizeLimit or raise resources.limits.memory" $v.shm.sizeLimit .) }}
{{- end }}
{{- end }}

{{- if and (eq $v.job.restartPolicy "ExitCode") (not (include "dmdr.durableOutputs" .)) }}
{{- fail "job.restartPolicy=ExitCode recreates pods, which deletes their emptyDir outputs and every checkpoint with them: set storage.s3.uri or storage.outputs.existingClaim, or use job.restartPolicy=OnFailure" }}
{{- end }}

{{- if and $indexed (not (include "dmdr.durableOutputs" .)) }}
{{- fail (printf "launcher=%s replaces a failed pod with a new one, which deletes its emptyDir outputs and every checkpoint with them: set storage.s3.uri or storage.outputs.existingClaim" $v.launcher) }}
{{- end }}
{{- if and $indexed $v.gangScheduling.enabled }}
{{- fail (printf "gangScheduling.enabled does not work with launcher=%s (no controller creates the pod group): admit the pods together with Kueue (kueue.queueName), or use launcher=pytorchjob" $v.launcher) }}
{{- end }}
{{- if and $v.kueue.queueName $v.gangScheduling.enabled }}
{{- fail "kueue.queueName and gangScheduling.enabled are both set: Kueue already admits the whole job at once; use one of them" }}
{{- end }}
{{- if and $v.gangScheduling.enabled $v.gangScheduling.minAvailable }}
{{- if gt (int $v.gangScheduling.minAvailable) $replicas }}
{{- fail (printf "gangScheduling.minAvailable (%d) is larger than job.replicas (%d): the group could never be scheduled; lower it" (int $v.gangScheduling.minAvailable) $replicas) }}
{{- end }}
{{- end }}

{{- $create := $v.storage.cache.create }}
{{- if and $create.enabled $v.storage.cache.existingClaim }}
{{- fail "storage.cache.create.enabled and storage.cache.existingClaim are both set: use one of them" }}
{{- end }}
{{- $maxPods := ternary (int $v.elastic.maxReplicas) $replicas (eq (include "dmdr.elastic" .) "true") }}
{{- if and $create.enabled (eq $create.accessMode "ReadWriteOnce") (gt $maxPods 1) }}
{{- fail (printf "storage.cache.create.accessMode=ReadWriteOnce cannot be mounted by %d pods on different nodes: use ReadWriteMany, or drop the PVC (an emptyDir per pod)" $maxPods) }}
{{- end }}
{{- if and (gt $maxPods 1) (not (include "dmdr.durableOutputs" .)) }}
{{- fail (printf "the job may run %d pods, each resuming (--resume-ckpt auto) from checkpoints in its own emptyDir, so restarted pods would resume from different steps or none: set storage.s3.uri, or storage.outputs.existingClaim to a ReadWriteMany PVC shared by all pods" $maxPods) }}
{{- end }}

{{- $reserved := dict "output_dir" "it is fixed to the mounted volume /workspace/outputs (size it with storage.outputs)" "exp_name" "use training.expName" "cache_dir" "the cache is the volume at /home/dmdr/.cache (see storage.cache)" "s3_uri" "use storage.s3.uri" "s3_endpoint_url" "use storage.s3.endpointUrl" "resume_ckpt" "the chart always resumes with --resume-ckpt auto" "init_ckpt" "use training.initCkpt" "preset" "use training.preset" }}
{{- $credential := include "dmdr.credentialPattern" . }}
{{- range $key, $_ := $v.training.overrides }}
{{- if hasKey $reserved $key }}
{{- fail (printf "training.overrides.%s is set by the chart: %s" $key (get $reserved $key)) }}
{{- end }}
{{- if regexMatch $credential $key }}
{{- fail (printf "training.overrides.%s looks like a credential, and overrides are stored in a plaintext ConfigMap: put it in a Secret and pass it with extraEnv valueFrom.secretKeyRef (or hfToken / storage.s3.credentials)" $key) }}
{{- end }}
{{- end }}
{{- with $v.training.overrides.shutdown_grace }}
{{- $max := include "dmdr.maxShutdownGrace" $ | int }}
{{- if gt (. | float64) ($max | float64) }}
{{- fail (printf "training.overrides.shutdown_grace (%v s) does not fit job.terminationGracePeriodSeconds (%d s): torchrun kills the workers %s s after SIGTERM, so uploads would be cut off; lower shutdown_grace to at most %d or raise terminationGracePeriodSeconds" . (int $v.job.terminationGracePeriodSeconds) (include "dmdr.shutdownTimeout" $) $max) }}
{{- end }}
{{- end }}
{{- range $key, $value := dict "report_to" "tracking.tracker" "tracker_project" "tracking.project" "tracker_run_name" "tracking.runName" }}
{{- if hasKey $v.training.overrides $key }}
{{- fail (printf "training.overrides.%s is set by the chart: use %s" $key $value) }}
{{- end }}
{{- end }}
{{- range $key, $url := dict "tracking.wandb.baseUrl" $v.tracking.wandb.baseUrl "tracking.mlflow.trackingUri" $v.tracking.mlflow.trackingUri }}
{{- if regexMatch "^[a-z]+://[^/]*@" $url }}
{{- fail (printf "%s carries credentials (user:password@), which would be stored in plaintext: drop them and pass the key with tracking.wandb.apiKeySecret / tracking.mlflow.tokenSecret" $key) }}
{{- end }}
{{- end }}
{{- if and (has "wandb" (splitList "," $v.tracking.tracker)) (not $v.tracking.wandb.apiKeySecret) }}
{{- $wandbEnv := list }}
{{- range $v.extraEnv }}{{ $wandbEnv = append $wandbEnv .name }}{{ end }}
{{- if not (or (has "WANDB_API_KEY" $wandbEnv) (has "WANDB_MODE" $wandbEnv) $v.envFrom) }}
{{- fail "tracking.tracker names wandb but tracking.wandb.apiKeySecret is empty: create a Secret with the W&B API key and name it there (or set WANDB_MODE=offline in extraEnv, or WANDB_API_KEY through envFrom)" }}
{{- end }}
{{- end }}
{{- include "dmdr.validateListKeys" . }}
{{- range $v.extraEnv }}
{{- if and (regexMatch $credential .name) (hasKey . "value") }}
{{- fail (printf "extraEnv %s has a literal value, which would be stored in the job spec in plaintext: use valueFrom.secretKeyRef with a Secret instead" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The API server keys these lists (x-kubernetes-list-type: map in the PyTorchJob CRD and the
core Pod schema) and refuses two items with one key ("Duplicate value") at install time:
env by name, volumes by name, volumeMounts by mountPath. The chart's own items plus
extraEnv / nccl.extraEnv / extraVolumes / extraVolumeMounts are checked here, in the pod as
rendered. Names the training operator injects are refused too: its value would win.
*/}}
{{- define "dmdr.validateListKeys" -}}
{{- $pod := include "dmdr.podTemplate" . | fromYaml }}
{{- $operator := "^(PET_[A-Z_]+|MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|PYTHONUNBUFFERED|JOB_COMPLETION_INDEX)$" }}
{{- $userEnv := keys .Values.nccl.extraEnv | sortAlpha }}
{{- range .Values.extraEnv }}{{ $userEnv = append $userEnv .name }}{{ end }}
{{- range $userEnv }}
{{- if regexMatch $operator . }}
{{- fail (printf "env %s is set by the training operator or the chart's launcher (%s), whose value must win: remove it from extraEnv / nccl.extraEnv" . $.Values.launcher) }}
{{- end }}
{{- end }}
{{- range $pod.spec.containers }}
{{- $seen := dict }}
{{- range .env }}
{{- if hasKey $seen .name }}
{{- fail (printf "env %s is set twice in the pod (the chart sets it, or extraEnv / nccl.extraEnv name it again), which the API server refuses: remove the duplicate from extraEnv or nccl.extraEnv" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- end }}
{{- $paths := dict }}
{{- range .volumeMounts }}
{{- if hasKey $paths .mountPath }}
{{- fail (printf "two volumeMounts at %s (the chart mounts /etc/dmdr, /dev/shm, /tmp, /home/dmdr, /home/dmdr/.cache, /workspace/outputs): give the extraVolumeMounts entry another mountPath" .mountPath) }}
{{- end }}
{{- $_ := set $paths .mountPath true }}
{{- end }}
{{- end }}
{{- $names := dict }}
{{- range $pod.spec.volumes }}
{{- if hasKey $names .name }}
{{- fail (printf "two volumes named %s (the chart's are config, dshm, tmp, home, cache, outputs): rename the extraVolumes entry (and its extraVolumeMounts name)" .name) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- range concat $pod.spec.containers ($pod.spec.initContainers | default list) }}
{{- $container := .name }}
{{- range .volumeMounts }}
{{- if not (hasKey $names .name) }}
{{- fail (printf "container %s mounts a volume named %s at %s, but the pod has no such volume (the chart's are config, dshm, tmp, home, cache, outputs): add it to extraVolumes or fix the name" $container .name .mountPath) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
