"""Parity of the psp and cpsp heads (train/heads/psp.py) with the authors' code.

The reference side is rebuilt here from the published definitions: jasongief/PSP_CVPR_2021
(``fully_model.py``: AVGA, LSTM_A_V, PSP, Classify, AVSimilarity, psp_net; ``weakly_model.py``: PSP,
psp_net; ``measure.py``: compute_acc, AVPSLoss; ``dataloader.py``: the AVPS target; the loss lines of
``fully_supervised_main.py`` / ``weakly_supervised_main.py``) and jasongief/CPSP ``cpsp_avel``
(``model/psp_family.py``: fully_psp_net, weakly_psp_net; ``losses.py``; the loss lines and
``compute_accuracy_supervised`` of ``fully_supv_main.py`` / ``weakly_supv_main.py``), with the same layer
names, sizes and forward order, for CPU and float64 (the originals call ``.cuda()``; T is read from the
inputs where the original writes 10). Every registered layer is built, unused ones included, so the
registered parameter counts are the reference's. Identical weights are loaded into both sides through
an explicit state-dict key map and outputs, losses, predictions and gradients are compared.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from train.heads.psp import psp_avps_target, segment_contrastive_loss
from train.registry import get_head

from heads_testutils import n_params

torch.set_num_threads(1)  # small tensors: one thread is fastest (no spin-waiting on a busy machine)

C = 29  # 28 events + background (index 28)
B = 6
#: the video classes of the test batch: every class-3 video has 4 other-class videos, the others 5
#: (L_vpsa's 4 nearest negatives exist for every anchor, as in a reference batch of 64)
VIDEO_CLASSES = (3, 3, 7, 12, 20, 27)


# ---------------------------------------------------------------------------------------------
# transcription of the reference modules


class RefAVGA(nn.Module):
    """AVGA (fully_model.py; the same in weakly_model.py and psp_family.py)."""

    def __init__(self, a_dim=128, v_dim=512, hidden_size=512, map_size=49):
        super().__init__()
        self.relu = nn.ReLU()
        self.affine_audio = nn.Linear(a_dim, hidden_size)
        self.affine_video = nn.Linear(v_dim, hidden_size)
        self.affine_v = nn.Linear(hidden_size, map_size, bias=False)
        self.affine_g = nn.Linear(hidden_size, map_size, bias=False)
        self.affine_h = nn.Linear(map_size, 1, bias=False)
        for layer in (self.affine_v, self.affine_g, self.affine_h, self.affine_audio, self.affine_video):
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, audio, video):
        V_DIM = video.size(-1)
        v_t = video.view(video.size(0) * video.size(1), -1, V_DIM)
        V = v_t
        v_t = self.relu(self.affine_video(v_t))
        a_t = audio.view(-1, audio.size(-1))
        a_t = self.relu(self.affine_audio(a_t))
        content_v = self.affine_v(v_t) + self.affine_g(a_t).unsqueeze(2)
        z_t = self.affine_h(torch.tanh(content_v)).squeeze(2)
        alpha_t = F.softmax(z_t, dim=-1).view(z_t.size(0), -1, z_t.size(1))
        c_t = torch.bmm(alpha_t, V).view(-1, V_DIM)
        self.alpha = alpha_t.view(video.size(0), video.size(1), -1)  # kept for the comparison
        return c_t.view(video.size(0), -1, V_DIM)


class RefLSTM_A_V(nn.Module):
    def __init__(self, a_dim, v_dim, hidden_dim=128):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.lstm_audio = nn.LSTM(a_dim, hidden_dim, 1, batch_first=True, bidirectional=True, dropout=0.0)
        self.lstm_video = nn.LSTM(v_dim, hidden_dim, 1, batch_first=True, bidirectional=True, dropout=0.0)

    def forward(self, a_fea, v_fea):
        # init_hidden: zeros (2, bs, a_dim); a_dim of the features = hidden_dim in every reference model
        zeros = a_fea.new_zeros(2, a_fea.size(0), self.hidden_dim)
        lstm_audio, _ = self.lstm_audio(a_fea, (zeros, zeros))
        lstm_video, _ = self.lstm_video(v_fea, (zeros, zeros))
        return lstm_audio, lstm_video


class RefPSP(nn.Module):
    """PSP of fully_model.py (= psp_family.py's)."""

    def __init__(self, a_dim=256, v_dim=256, hidden_dim=256, out_dim=256):
        super().__init__()
        self.v_L1 = nn.Linear(v_dim, hidden_dim, bias=False)
        self.v_L2 = nn.Linear(v_dim, hidden_dim, bias=False)
        self.v_fc = nn.Linear(v_dim, out_dim, bias=False)
        self.a_L1 = nn.Linear(a_dim, hidden_dim, bias=False)
        self.a_L2 = nn.Linear(a_dim, hidden_dim, bias=False)
        self.a_fc = nn.Linear(a_dim, out_dim, bias=False)
        self.activation = nn.ReLU()
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(p=0.1)
        self.layer_norm = nn.LayerNorm(out_dim, eps=1e-6)
        for layer in (self.v_L1, self.v_L2, self.a_L1, self.a_L2, self.a_fc, self.v_fc):
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, a_fea, v_fea, thr_val):
        v_branch1 = self.dropout(self.activation(self.v_L1(v_fea)))
        v_branch2 = self.dropout(self.activation(self.v_L2(v_fea)))
        a_branch1 = self.dropout(self.activation(self.a_L1(a_fea)))
        a_branch2 = self.dropout(self.activation(self.a_L2(a_fea)))
        beta_va = torch.bmm(v_branch2, a_branch1.permute(0, 2, 1))
        beta_va = beta_va / math.sqrt(v_branch2.shape[2])
        beta_va = F.relu(beta_va)
        beta_av = beta_va.permute(0, 2, 1)
        sum_v_to_a = torch.sum(beta_va, dim=-1, keepdim=True)
        beta_va = beta_va / (sum_v_to_a + 1e-8)
        self.kept = (beta_va > thr_val).to(beta_va.dtype).mean()  # share of pairs the pruning keeps
        gamma_va = (beta_va > thr_val).to(beta_va.dtype) * beta_va  # fully_model.py:150 .float(): the mask in the model's dtype
        sum_v_to_a = torch.sum(gamma_va, dim=-1, keepdim=True)
        gamma_va = gamma_va / (sum_v_to_a + 1e-8)
        sum_a_to_v = torch.sum(beta_av, dim=-1, keepdim=True)
        beta_av = beta_av / (sum_a_to_v + 1e-8)
        gamma_av = (beta_av > thr_val).to(beta_av.dtype) * beta_av
        sum_a_to_v = torch.sum(gamma_av, dim=-1, keepdim=True)
        gamma_av = gamma_av / (sum_a_to_v + 1e-8)
        a_pos = torch.bmm(gamma_va, a_branch2)
        v_psp = v_fea + a_pos
        v_pos = torch.bmm(gamma_av, v_branch1)
        a_psp = a_fea + v_pos
        v_psp = self.dropout(self.relu(self.v_fc(v_psp)))
        a_psp = self.dropout(self.relu(self.a_fc(a_psp)))
        v_psp = self.layer_norm(v_psp)
        a_psp = self.layer_norm(a_psp)
        a_v_fuse = torch.mul(v_psp + a_psp, 0.5)
        return a_v_fuse, v_psp, a_psp


class RefWeakPSP(nn.Module):
    """PSP of weakly_model.py: no renormalisation after pruning, no v_fc / a_fc."""

    def __init__(self, a_dim=256, v_dim=256, hidden_dim=256, out_dim=256):
        super().__init__()
        self.v_L1 = nn.Linear(v_dim, hidden_dim, bias=False)
        self.v_L2 = nn.Linear(v_dim, hidden_dim, bias=False)
        self.a_L1 = nn.Linear(a_dim, hidden_dim, bias=False)
        self.a_L2 = nn.Linear(a_dim, hidden_dim, bias=False)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(p=0.1)
        self.layer_norm = nn.LayerNorm(out_dim, eps=1e-6)
        for layer in (self.v_L1, self.v_L2, self.a_L1, self.a_L2):
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, a_fea, v_fea, thr_val):
        v_branch1 = self.dropout(self.activation(self.v_L1(v_fea)))
        v_branch2 = self.dropout(self.activation(self.v_L2(v_fea)))
        a_branch1 = self.dropout(self.activation(self.a_L1(a_fea)))
        a_branch2 = self.dropout(self.activation(self.a_L2(a_fea)))
        beta_va = torch.bmm(v_branch2, a_branch1.permute(0, 2, 1))
        beta_va = beta_va / math.sqrt(v_branch2.shape[2])
        beta_va = F.relu(beta_va)
        beta_av = beta_va.permute(0, 2, 1)
        sum_v_to_a = torch.sum(beta_va, dim=-1, keepdim=True)
        beta_va = beta_va / (sum_v_to_a + 1e-8)
        self.kept = (beta_va > thr_val).to(beta_va.dtype).mean()
        gamma_va = (beta_va > thr_val).to(beta_va.dtype) * beta_va
        sum_a_to_v = torch.sum(beta_av, dim=-1, keepdim=True)
        beta_av = beta_av / (sum_a_to_v + 1e-8)
        gamma_av = (beta_av > thr_val).to(beta_av.dtype) * beta_av
        a_pos = torch.bmm(gamma_va, a_branch2)
        v_psp = v_fea + a_pos
        v_pos = torch.bmm(gamma_av, v_branch1)
        a_psp = a_fea + v_pos
        v_psp = self.layer_norm(v_psp)
        a_psp = self.layer_norm(a_psp)
        return torch.mul(v_psp + a_psp, 0.5)


class RefClassify(nn.Module):
    def __init__(self, hidden_dim=256, category_num=28):
        super().__init__()
        self.L1 = nn.Linear(hidden_dim, 64, bias=False)
        self.L2 = nn.Linear(64, category_num, bias=False)


def ref_av_simm(v_fea, a_fea):
    """AVSimilarity.forward."""
    return torch.sum(torch.mul(F.normalize(v_fea, dim=-1), F.normalize(a_fea, dim=-1)), dim=-1)


class RefPspNetFully(nn.Module):
    """psp_net of fully_model.py (registers linear_v, v_classify, a_classify, L3, L4 without using them)."""

    def __init__(self, a_dim=128, v_dim=512, hidden_dim=128, category_num=29):
        super().__init__()
        self.fa = nn.Sequential(nn.Linear(a_dim, 256, bias=False), nn.Linear(256, 128, bias=False))
        self.fv = nn.Sequential(nn.Linear(v_dim, 256, bias=False), nn.Linear(256, 128, bias=False))
        self.linear_v = nn.Linear(v_dim, a_dim)
        self.relu = nn.ReLU()
        self.attention = RefAVGA(v_dim=v_dim)
        self.lstm_a_v = RefLSTM_A_V(a_dim=a_dim, v_dim=hidden_dim, hidden_dim=hidden_dim)
        self.psp = RefPSP(a_dim=a_dim * 2, v_dim=hidden_dim * 2)
        self.v_classify = RefClassify(hidden_dim=256)
        self.a_classify = RefClassify(hidden_dim=256)
        self.L1 = nn.Linear(2 * hidden_dim, 64, bias=False)
        self.L2 = nn.Linear(64, category_num, bias=False)
        self.L3 = nn.Linear(256, 64)
        self.L4 = nn.Linear(64, 2)

    def forward(self, audio, video, thr_val):
        fa_fea = self.fa(audio)
        video_t = self.attention(fa_fea, video)
        video_t = self.fv(video_t)
        lstm_audio, lstm_video = self.lstm_a_v(fa_fea, video_t)
        fusion, final_v_fea, final_a_fea = self.psp(lstm_audio, lstm_video, thr_val=thr_val)
        cross_att = ref_av_simm(final_v_fea, final_a_fea)
        out = self.relu(self.L1(fusion))
        out = self.L2(out)
        return fusion, out, cross_att


class RefPspNetWeak(nn.Module):
    """psp_net of weakly_model.py (registers temperature, W1, W2 without using them)."""

    def __init__(self, a_dim=128, v_dim=512, hidden_dim=128, category_num=29):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(1, category_num))
        self.linear_v = nn.Linear(v_dim, a_dim)
        self.relu = nn.ReLU()
        self.attention = RefAVGA()
        self.lstm_a_v = RefLSTM_A_V(a_dim=a_dim, v_dim=hidden_dim, hidden_dim=hidden_dim)
        self.psp = RefWeakPSP(a_dim=a_dim * 2, v_dim=hidden_dim * 2)
        self.W1 = nn.Linear(2 * hidden_dim, 1, bias=False)
        self.W2 = nn.Linear(64, 1, bias=False)
        self.W3 = nn.Linear(29, 1, bias=False)
        self.L1 = nn.Linear(2 * hidden_dim, 64, bias=False)
        self.L2 = nn.Linear(64, category_num, bias=False)

    def forward(self, audio, video, thr_val):
        fa_fea = audio
        video_t = self.attention(fa_fea, video)
        video_t = self.linear_v(video_t)
        lstm_audio, lstm_video = self.lstm_a_v(fa_fea, video_t)
        fusion = self.psp(lstm_audio, lstm_video, thr_val)
        out = self.relu(self.L1(fusion))
        score = self.L2(out)
        temporal_wei = self.relu(self.W3(score))
        temporal_wei = torch.sigmoid(temporal_wei)
        score = score * temporal_wei.expand_as(score)
        out = score.permute(0, 2, 1)
        out_avg = nn.AvgPool1d(out.size(2))(out).view(out.size(0), -1)
        out_avg = F.softmax(out_avg, dim=-1)
        return out_avg, score


class RefCPSPNet(nn.Module):
    """fully_psp_net / weakly_psp_net of psp_family.py with vis_fea_type='vgg' (same layers; registers
    linear_v, v_classify, a_classify, L1, L2 without using them). ``weak`` picks the forward."""

    def __init__(self, weak=False, a_dim=128, v_dim=512, hidden_dim=128, category_num=28, thr_val=0.099):
        super().__init__()
        self.weak = weak
        self.thr_val = thr_val
        self.fa = nn.Sequential(nn.Linear(a_dim, 256, bias=False), nn.Linear(256, 128, bias=False))
        self.fv = nn.Sequential(nn.Linear(512, 256, bias=False), nn.Linear(256, 128, bias=False))
        self.linear_v = nn.Linear(v_dim, a_dim)
        self.relu = nn.ReLU()
        self.attention = RefAVGA(v_dim=512)
        self.lstm_a_v = RefLSTM_A_V(a_dim=a_dim, v_dim=hidden_dim, hidden_dim=hidden_dim)
        self.psp = RefPSP(a_dim=a_dim * 2, v_dim=hidden_dim * 2)
        self.v_classify = RefClassify(hidden_dim=256)
        self.a_classify = RefClassify(hidden_dim=256)
        self.L1 = nn.Linear(2 * hidden_dim, 64, bias=False)
        self.L2 = nn.Linear(64, category_num, bias=False)
        self.event_classifier = nn.Sequential(nn.Linear(2 * hidden_dim, 1))
        self.category_classifier = nn.Sequential(nn.Linear(2 * hidden_dim, category_num))

    def forward(self, video, audio):
        fa_fea = self.fa(audio)
        video_t = self.attention(fa_fea, video)
        video_t = self.fv(video_t)
        lstm_audio, lstm_video = self.lstm_a_v(fa_fea, video_t)
        fusion, final_v_fea, final_a_fea = self.psp(lstm_audio, lstm_video, thr_val=self.thr_val)
        if not self.weak:  # fully_psp_net
            avps = ref_av_simm(final_v_fea, final_a_fea)
            event_logits = self.event_classifier(fusion).squeeze(-1)
            avg_fea = fusion.mean(dim=1)
            category_logits = self.category_classifier(avg_fea)
            return event_logits, category_logits, avps, fusion
        event_logits = self.event_classifier(fusion)  # weakly_psp_net, pooling_type 'avg'
        video_fea = fusion.mean(1)
        category_logits = self.category_classifier(video_fea)[:, None, :]
        fused_logits = event_logits.sigmoid() * category_logits
        logits, _ = torch.max(fused_logits, dim=1)
        predict_video_labels = F.softmax(logits, dim=-1)
        return fusion, event_logits.squeeze(), category_logits.squeeze(), predict_video_labels


# ---------------------------------------------------------------------------------------------
# transcription of the reference losses and accuracy functions


def ref_avps_loss(av_simm, soft_label):
    """AVPSLoss (measure.py, losses.py)."""
    relu_av_simm = F.relu(av_simm)
    sum_av_simm = torch.sum(relu_av_simm, dim=-1, keepdim=True)
    avg_av_simm = relu_av_simm / (sum_av_simm + 1e-8)
    return nn.MSELoss()(avg_av_simm, soft_label)


def ref_segment_wise_relation(batch_labels):
    """AVE_Fully_Dataset.get_segment_wise_relation on fresh (zeroed) buffers: (segment labels, AVPS target)."""
    bs, seg_num, _ = batch_labels.shape
    segment_label_batch = np.zeros([bs, seg_num], np.float32)
    segment_avps_gt_batch = np.zeros([bs, seg_num])
    for i in range(bs):
        col_sum = np.sum(batch_labels[i].T, axis=1)
        category_bg_cols = col_sum.nonzero()[0].tolist()
        category_bg_cols.sort()
        category_col = batch_labels[i, :, category_bg_cols[0]]
        same_category_row_idx = category_col.nonzero()[0].tolist()
        if len(same_category_row_idx) != 0:
            segment_avps_gt_batch[i, same_category_row_idx] = 1 / len(same_category_row_idx)
    for i in range(bs):
        row_idx, col_idx = np.where(batch_labels[i] == 1)
        segment_label_batch[i, row_idx] = col_idx
    return torch.from_numpy(segment_label_batch).long(), torch.from_numpy(segment_avps_gt_batch)


def ref_compute_acc(labels, x_labels, nb_batch):
    """compute_acc (measure.py); also returns the predictions."""
    seg_num = x_labels.shape[1]
    pre_labels, real_labels = np.zeros(nb_batch * seg_num), np.zeros(nb_batch * seg_num)
    c = 0
    for i in range(nb_batch):
        for j in range(seg_num):
            pre_labels[c] = np.argmax(x_labels[i, j, :])
            real_labels[c] = np.argmax(labels[i, j, :])
            c += 1
    return float(np.mean(real_labels == pre_labels)), pre_labels.reshape(nb_batch, seg_num)


def ref_get_flag_by_gt(is_event_scores):
    """get_flag_by_gt (fully_supv_main.py), 10 -> T."""
    seg_num = is_event_scores.shape[1]
    pred_temp = is_event_scores.long()
    pred = pred_temp.unsqueeze(1)
    pos_flag = pred.repeat(1, seg_num, 1)
    pos_flag *= pred.permute(0, 2, 1)
    neg_flag = (1 - pred).repeat(1, seg_num, 1)
    neg_flag *= pred.permute(0, 2, 1)
    return pred_temp, pos_flag, neg_flag


def ref_segment_contrastive_loss(fusion, frame_corr_one_hot, segment_flag_pos, segment_flag_neg, t=0.6):
    """segment_contrastive_loss (losses.py), num_bg = 10 - num_event -> T - num_event."""
    num_event = torch.sum(frame_corr_one_hot, dim=-1, keepdim=True)
    all_bg_flag = (num_event != 0).to(torch.float64)
    num_bg = fusion.shape[1] - num_event
    fusion = F.normalize(fusion, dim=-1)
    cos_simm = torch.bmm(fusion, fusion.permute(0, 2, 1))
    mask_simm_neg = cos_simm * segment_flag_neg
    mask_simm_neg = mask_simm_neg / t
    mask_simm_exp_neg = torch.exp(mask_simm_neg) * segment_flag_neg
    mask_simm_pos = cos_simm * segment_flag_pos
    mask_simm_pos = mask_simm_pos / t
    mask_simm_exp_pos = torch.exp(mask_simm_pos) * segment_flag_pos
    simm_pos = torch.sum(mask_simm_exp_pos, dim=1)
    avg_simm_all_negs = torch.sum(mask_simm_exp_neg, dim=1) / (num_bg + 1e-12)
    simm_pos_all_negs = simm_pos + avg_simm_all_negs
    temp_result = simm_pos / (simm_pos_all_negs + 1e-12)
    loss = torch.sum((-1) * torch.log(temp_result + 1e-12), dim=-1, keepdim=True) / (num_event + 1e-12)
    loss = loss * all_bg_flag
    return torch.sum(loss) / torch.sum(all_bg_flag)


def ref_video_contrastive_loss(fusion, batch_class_labels, margin=0.2, neg_num=3):
    """video_contrastive_loss (losses.py; ``addmm_(1, -2, ...)`` in today's keyword form)."""
    fusion = F.normalize(fusion, dim=-1)
    avg_fea = torch.mean(fusion, dim=1)
    bs = avg_fea.size(0)
    dist = torch.pow(avg_fea, 2).sum(dim=1, keepdim=True).expand(bs, bs)
    dist = dist + dist.t()
    dist = dist.addmm(avg_fea, avg_fea.t(), beta=1, alpha=-2)
    dist = dist.clamp(min=1e-12).sqrt()
    mask = batch_class_labels.expand(bs, bs).eq(batch_class_labels.expand(bs, bs).t()).double()
    INF = 1e12
    NEG_INF = (-1) * INF
    dist_ap = dist * mask
    dist_an = dist * (1 - mask)
    dist_ap = dist_ap + torch.ones_like(dist_ap) * NEG_INF * (1 - mask)
    dist_an = dist_an + torch.ones_like(dist_an) * INF * mask
    topk_dist_ap, _ = dist_ap.topk(k=1, dim=1, largest=True, sorted=True)
    topk_dist_an, _ = dist_an.topk(k=neg_num, dim=1, largest=False, sorted=True)
    avg_topk_dist_ap = topk_dist_ap.squeeze(-1)
    avg_topk_dist_an = topk_dist_an.mean(dim=-1)
    y = torch.ones_like(avg_topk_dist_an)
    return nn.MarginRankingLoss(margin=margin)(avg_topk_dist_an, avg_topk_dist_ap, y)


def ref_cpsp_supervised_loss(outputs, labels):
    """The loss lines of fully_supv_main.py's train_epoch with run_fully_supv.sh's flags
    (--avps_flag --lambda_avps 100 --scon_flag --lambda_scon 0.01 --vcon_flag --lambda_vcon 1)."""
    is_event_scores, event_scores, avps, fusion = outputs
    labels_foreground = labels[:, :, :-1]
    labels_BCE, labels_evn = labels_foreground.max(-1)
    labels_event, _ = labels_evn.max(-1)
    event_flag, pos_flag, neg_flag = ref_get_flag_by_gt(labels_BCE)
    loss_is_event = nn.BCEWithLogitsLoss()(is_event_scores, labels_BCE)
    loss_event_class = nn.CrossEntropyLoss()(event_scores, labels_event)
    loss = loss_is_event + loss_event_class
    soft_labels = labels_BCE / (labels_BCE.sum(-1, keepdim=True) + 1e-6)
    loss_avps = ref_avps_loss(avps, soft_labels)
    loss = loss + 100 * loss_avps
    loss_scon = ref_segment_contrastive_loss(fusion, event_flag, pos_flag, neg_flag)
    loss = loss + 0.01 * loss_scon
    loss_vcon = ref_video_contrastive_loss(fusion, labels_event)
    loss = loss + 1 * loss_vcon
    return loss, {"is_event": loss_is_event, "event_class": loss_event_class, "avps": loss_avps,
                  "scon": loss_scon, "vcon": loss_vcon}


def ref_cpsp_weak_loss(outputs, mil_labels):
    """The loss lines of weakly_supv_main.py's train_epoch with run_weakly_supv.sh's flags
    (--lambda_vcon 1 --vcon_flag --margin 0.6 --neg_num 4); labels = mil_labels[:-1] columns."""
    fusion, _, _, event_scores = outputs
    labels = mil_labels[:, :-1]
    loss_event_class = nn.MultiLabelSoftMarginLoss()(event_scores, labels)
    _, event_class_flag = labels.max(-1)
    loss_vcon = ref_video_contrastive_loss(fusion, event_class_flag, margin=0.6, neg_num=4)
    return loss_event_class + 1 * loss_vcon, {"mil": loss_event_class, "vcon": loss_vcon}


def ref_compute_accuracy_supervised(is_event_scores, event_scores, labels, bg_flag=28):
    """compute_accuracy_supervised (fully_supv_main.py / weakly_supv_main.py); also returns pred."""
    _, targets = labels.max(-1)
    is_event_scores = is_event_scores.sigmoid()
    scores_pos_ind = is_event_scores > 0.5
    scores_mask = scores_pos_ind == 0
    _, event_class = event_scores.max(-1)
    pred = scores_pos_ind.long()
    pred *= event_class[:, None]
    pred[scores_mask] = bg_flag
    correct = pred.eq(targets)
    return correct.sum().double() * (100.0 / correct.numel()), pred


# ---------------------------------------------------------------------------------------------
# weights, inputs, labels


#: ours -> reference where the names differ (LSTM_A_V nesting, one-layer Sequentials)
RENAMED = (("lstm_audio.", "lstm_a_v.lstm_audio."), ("lstm_video.", "lstm_a_v.lstm_video."),
           ("event_classifier.", "event_classifier.0."), ("category_classifier.", "category_classifier.0."))

#: reference layers that are registered but never run (not built by our heads)
UNUSED = {
    ("psp", "supervised"): {"linear_v", "v_classify", "a_classify", "L3", "L4"},
    ("psp", "weak"): {"temperature", "W1", "W2"},
    ("cpsp", "supervised"): {"linear_v", "v_classify", "a_classify", "L1", "L2"},
    ("cpsp", "weak"): {"linear_v", "v_classify", "a_classify", "L1", "L2"},
}

#: (registered by the reference model, ours = used) at the defaults, C = 29
COUNTS = {
    ("psp", "supervised"): (1_667_251, 1_548_657),
    ("psp", "weak"): (1_254_251, 1_253_902),
    ("cpsp", "supervised"): (1_658_062, 1_537_870),
    ("cpsp", "weak"): (1_658_062, 1_537_870),
}


def reference_key(key: str) -> str:
    for ours, ref in RENAMED:
        if key.startswith(ours):
            return ref + key[len(ours):]
    return key


def reference_model(name, setting, thr=None):
    """The reference model; its threshold (``thr_val``) is an argument of psp_net.forward, an attribute of
    CPSP's nets (``thr`` None: the run scripts' 0.099 / 0.095)."""
    if name == "psp":
        return RefPspNetFully() if setting == "supervised" else RefPspNetWeak()
    if thr is None:
        thr = 0.099 if setting == "supervised" else 0.095
    return RefCPSPNet(weak=setting == "weak", thr_val=thr)


#: thresholds for the output tests per T: the reference's at T = 10; at T = 4 the normalised rows average
#: 1/4, so a larger one keeps the pruning active
THRESHOLDS = {10: {"supervised": 0.099, "weak": 0.095}, 4: {"supervised": 0.25, "weak": 0.25}}


def build_pair(name, setting, T=10):
    thr = THRESHOLDS[T][setting]
    torch.manual_seed(1)
    ref = reference_model(name, setting, thr).double().eval()
    torch.manual_seed(2)  # different init: parity must come from the copied weights
    config = get_head(name).make_config({f"threshold_{setting}": thr})
    ours = get_head(name)(C, setting, config).double().eval()
    ref_state = ref.state_dict()
    mapped = {key: ref_state[reference_key(key)] for key in ours.state_dict()}
    left = {key.split(".")[0] for key in set(ref_state) - {reference_key(k) for k in ours.state_dict()}}
    assert left == UNUSED[(name, setting)], f"reference layers without a counterpart: {left}"
    ours.load_state_dict(mapped, strict=True)
    return ours, ref


def random_inputs(T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, T, 128, generator=g, dtype=torch.float64)
    visual = torch.rand(B, T, 7, 7, 512, generator=g, dtype=torch.float64) * 2.0
    return audio, visual


def event_labels(T=10, seed=0):
    """[B, T] labels: each video's class (VIDEO_CLASSES) on a span, background (28) elsewhere; the last
    video is an event everywhere (no background segment)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((B, T), C - 1, dtype=torch.long)
    for b, cls in enumerate(VIDEO_CLASSES):
        start = int(torch.randint(0, T // 2, (1,), generator=g))
        length = int(torch.randint(2, T - start + 1, (1,), generator=g))
        labels[b, start:start + length] = cls
    labels[-1] = VIDEO_CLASSES[-1]
    return labels


def batch_of(labels):
    return {"labels": labels, "video_label": torch.tensor(VIDEO_CLASSES),
            "valid": torch.ones(labels.shape, dtype=torch.bool)}


def one_hot(labels):
    return F.one_hot(labels, C).to(torch.float64)


class Case:
    """Both models with the same weights, one input batch, labels, and both forward passes (with
    autograd, eval mode). Built once per (head, setting, T) and shared by the tests (the 7 x 7 x 512
    attention dominates the run time)."""

    def __init__(self, name, setting, T):
        self.name, self.setting, self.T = name, setting, T
        self.ours, self.ref = build_pair(name, setting, T)
        with torch.no_grad():
            if (name, setting) == ("psp", "weak"):
                # ReLU(W3 score) > 0 somewhere: the temporal weight is not a constant 0.5
                self.ours.W3.weight.abs_()
                self.ref.W3.weight.abs_()
            if name == "cpsp":
                # spread the is-event logits around 0 so that both branches of the prediction rule occur
                self.ours.event_classifier.weight.mul_(20.0)
                self.ref.event_classifier[0].weight.mul_(20.0)
        seed = {"psp": 0, "cpsp": 2}[name] + (setting == "weak")
        self.audio, self.visual = random_inputs(T, seed)
        self.labels = event_labels(T, seed)
        self.thr = THRESHOLDS[T][setting]
        if name == "psp":
            self.expected = self.ref(self.audio, self.visual, self.thr)
        else:
            self.expected = self.ref(self.visual, self.audio)
        self.out = self.ours(self.audio, self.visual)


_CASES: dict = {}


def case(name, setting, T=10) -> Case:
    key = (name, setting, T)
    if key not in _CASES:
        _CASES[key] = Case(name, setting, T)
    return _CASES[key]


# ---------------------------------------------------------------------------------------------
# tests: parameters


@pytest.mark.parametrize("name,setting", list(COUNTS))
def test_parameter_counts(name, setting):
    registered, used = COUNTS[(name, setting)]
    assert n_params(reference_model(name, setting)) == registered
    assert n_params(get_head(name)(C, setting)) == used


def test_attention_is_avel_agva_with_xavier_weights():
    """PSP's AVGA = avel's AudioGuidedVisualAttention ("region" axis) with Xavier-uniform weights."""
    att = case("psp", "supervised").ours.attention
    assert att.audio_term_axis == "region"
    for layer in (att.affine_audio, att.affine_video, att.affine_v, att.affine_g, att.affine_h):
        fan_out, fan_in = layer.weight.shape
        assert layer.weight.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out)) + 1e-7


# ---------------------------------------------------------------------------------------------
# tests: outputs


@pytest.mark.parametrize("T", [10, 4])
def test_psp_supervised_outputs_match(T):
    c = case("psp", "supervised", T)
    fusion, out, cross_att = c.expected
    assert 0.05 < float(c.ref.psp.kept) < 0.95  # the pruning removes some pairs, not all
    torch.testing.assert_close(c.out.scores, out, rtol=0, atol=1e-10)
    torch.testing.assert_close(c.out.extras["av_similarity"], cross_att, rtol=0, atol=1e-10)
    torch.testing.assert_close(c.out.extras["fusion"], fusion, rtol=0, atol=1e-10)
    torch.testing.assert_close(c.out.spatial.reshape(B, T, 49), c.ref.attention.alpha, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [10, 4])
def test_psp_weak_outputs_match(T):
    c = case("psp", "weak", T)
    out_avg, score = c.expected
    assert 0.05 < float(c.ref.psp.kept) < 0.95
    assert c.out.extras["temporal_weight"].std() > 1e-3
    torch.testing.assert_close(c.out.scores, score, rtol=0, atol=1e-10)
    torch.testing.assert_close(c.out.scores.mean(dim=1).softmax(-1), out_avg, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [10, 4])
@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_cpsp_outputs_match(setting, T):
    c = case("cpsp", setting, T)
    s, cat = c.out.extras["is_event_scores"], c.out.extras["event_scores"]
    assert 0.05 < float(c.ref.psp.kept) < 0.95
    if setting == "supervised":
        event_logits, category_logits, avps, fusion = c.expected
        torch.testing.assert_close(c.out.extras["av_similarity"], avps, rtol=0, atol=1e-10)
    else:
        fusion, event_logits, category_logits, predict_video_labels = c.expected
        video = (torch.sigmoid(s)[..., None] * cat[:, None, :]).max(dim=1).values.softmax(-1)
        torch.testing.assert_close(video, predict_video_labels, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, event_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(cat, category_logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(c.out.extras["fusion"], fusion, rtol=0, atol=1e-10)
    assert c.out.scores.shape == (B, T, C)


# ---------------------------------------------------------------------------------------------
# tests: predictions


@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_psp_predictions_follow_compute_acc(setting):
    c = case("psp", setting)
    # fully: argmax of the logits; weak: of softmax(score) (weakly_supervised_main.py test())
    x_labels = c.expected[1] if setting == "supervised" else F.softmax(c.expected[1], -1)
    pred = c.ours.predict(c.out)
    acc, ref_pred = ref_compute_acc(one_hot(c.labels).numpy(), x_labels.detach().numpy(), B)
    assert np.array_equal(pred.numpy(), ref_pred)
    assert acc == pytest.approx(float((pred == c.labels).double().mean()))


@pytest.mark.parametrize("setting", ["supervised", "weak"])
def test_cpsp_predictions_follow_compute_accuracy_supervised(setting):
    c = case("cpsp", setting)
    is_event, category = (c.expected[0], c.expected[1]) if setting == "supervised" else (c.expected[1], c.expected[2])
    acc, ref_pred = ref_compute_accuracy_supervised(is_event.detach(), category.detach(), one_hot(c.labels),
                                                    bg_flag=C - 1)
    pred = c.ours.predict(c.out)
    assert torch.equal(pred, ref_pred)
    assert 0 < int((pred == C - 1).sum()) < pred.numel()
    assert torch.equal(c.out.scores.argmax(-1), pred)  # the scores' argmax is the same rule
    assert float(acc) == pytest.approx(100.0 * float((pred == c.labels).double().mean()))


# ---------------------------------------------------------------------------------------------
# tests: losses


def test_psp_supervised_loss_is_ce_plus_100_avps():
    c = case("psp", "supervised")
    fusion, out, cross_att = c.expected
    segment_label, avps_gt = ref_segment_wise_relation(one_hot(c.labels).numpy())
    assert torch.equal(segment_label, c.labels)
    loss_cls = nn.CrossEntropyLoss()(out.permute(0, 2, 1), segment_label)
    loss_avps = ref_avps_loss(cross_att, avps_gt)
    got = c.ours.loss(c.out, batch_of(c.labels))
    torch.testing.assert_close(got["ce"], loss_cls.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got["avps"], loss_avps.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got["loss"], loss_cls + 100 * loss_avps, rtol=0, atol=1e-10)


def test_psp_avps_target_of_a_background_only_video():
    """The reference's rule (lowest class index present): a background-only video gets 1/T everywhere."""
    labels = event_labels(seed=6)
    labels[0] = C - 1
    _, avps_gt = ref_segment_wise_relation(one_hot(labels).numpy())
    got = psp_avps_target(labels, torch.ones_like(labels, dtype=torch.bool), C, torch.float64)
    torch.testing.assert_close(got, avps_gt)


@pytest.mark.parametrize("target", ["proportions", "video"])
def test_psp_weak_loss_is_bce_of_the_averaged_scores(target):
    c = case("psp", "weak")
    out_avg, _ = c.expected
    # prob_label.h5: share of the video's segments per class, background included (issue #7);
    # mil_labels.h5: the one-hot video label
    prob_labels = one_hot(c.labels).mean(dim=1) if target == "proportions" else one_hot(torch.tensor(VIDEO_CLASSES))
    expected = nn.BCELoss()(out_avg, prob_labels)
    config = get_head("psp").make_config({"threshold_weak": c.thr, "weak_target": target})
    head = get_head("psp")(C, "weak", config)  # only its loss is used, on the shared outputs
    got = head.loss(c.out, batch_of(c.labels))
    torch.testing.assert_close(got["loss"], expected, rtol=0, atol=1e-12)


def test_cpsp_supervised_loss_matches_fully_supv_main():
    c = case("cpsp", "supervised")
    expected, terms = ref_cpsp_supervised_loss(c.expected, one_hot(c.labels))
    got = c.ours.loss(c.out, batch_of(c.labels))
    for name, value in terms.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(got["loss"], expected, rtol=0, atol=1e-10)
    assert float(terms["vcon"].detach()) > 0  # the hinge is active: a real comparison

    # same loss, same weights -> same gradients for every parameter the reference uses
    ref_params = dict(c.ref.named_parameters())
    ref_grads = dict(zip(ref_params, torch.autograd.grad(expected, list(ref_params.values()), allow_unused=True)))
    our_params = dict(c.ours.named_parameters())
    our_grads = dict(zip(our_params, torch.autograd.grad(got["loss"], list(our_params.values()))))
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, ref_grads[reference_key(key)], rtol=1e-7, atol=1e-10, msg=key)


def test_cpsp_weak_loss_matches_weakly_supv_main():
    c = case("cpsp", "weak")
    mil_labels = one_hot(torch.tensor(VIDEO_CLASSES))  # mil_labels.h5 rows: one 1 per video
    expected, terms = ref_cpsp_weak_loss(c.expected, mil_labels)
    got = c.ours.loss(c.out, batch_of(c.labels))
    for name, value in terms.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(got["loss"], expected, rtol=0, atol=1e-10)
    assert float(terms["vcon"].detach()) > 0


def test_published_segment_contrastive_loss_is_a_constant():
    """losses.py sums over the anchor axis: the value is -log(1e-12) n_bg / n_event averaged over videos
    with an event, and no gradient reaches the features; the "anchor" form does train them."""
    g = torch.Generator().manual_seed(10)
    fusion = torch.randn(B, 10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    is_event = event_labels(seed=10) != C - 1
    valid = torch.ones_like(is_event)
    loss = segment_contrastive_loss(fusion, is_event, valid, 0.6, "reference")
    n_event = is_event.sum(1).double()
    torch.testing.assert_close(loss.detach(), (-math.log(1e-12) * (10 - n_event) / n_event).mean(), rtol=1e-9, atol=0)
    flags = ref_get_flag_by_gt(is_event.double())
    torch.testing.assert_close(loss, ref_segment_contrastive_loss(fusion, *flags), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, fusion)
    assert grad.abs().max() < 1e-12

    anchor = segment_contrastive_loss(fusion, is_event, valid, 0.6, "anchor")
    (grad,) = torch.autograd.grad(anchor, fusion)
    assert grad.abs().max() > 1e-3
    # the anchor form written out with loops
    unit = F.normalize(fusion.detach(), dim=-1)
    per_video = []
    for b in range(B):
        ev = [i for i in range(10) if is_event[b, i]]
        bg = [k for k in range(10) if not is_event[b, k]]
        terms = []
        for i in ev:
            pos = sum(math.exp(float(unit[b, i] @ unit[b, j]) / 0.6) for j in ev)
            neg = sum(math.exp(float(unit[b, i] @ unit[b, k]) / 0.6) for k in bg) / max(len(bg), 1)
            terms.append(-math.log(pos / (pos + neg)))
        per_video.append(sum(terms) / len(terms))
    assert float(anchor.detach()) == pytest.approx(sum(per_video) / B, rel=1e-12)
